"""`stence ui`: the MLflow UI on the local tracking store (runs, sweeps, plots, registered models)."""

from __future__ import annotations

import argparse

from stence.commands._common import RAW, add_config_args, config_from_args
from stence.pipelines.ui import UiServer, mlflow_ui

EXAMPLE = """example:
  stence ui                                        # http://127.0.0.1:5000, store runs/mlflow.db
  stence ui --port 5001 --set tracking.uri=sqlite:////data/stence/mlflow.db

Binds to 127.0.0.1 unless --host says otherwise; a server reached by a DNS name must also get
--allowed-hosts. A remote tracking URI (http://...) already has its own UI: this command just prints it."""


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ui", help="start the MLflow UI on the local tracking store",
                       description=__doc__, epilog=EXAMPLE, formatter_class=RAW)
    p.add_argument("--port", type=int, default=5000, help="port (default 5000)")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--allowed-hosts", default=None, help="extra Host headers to accept (comma-separated)")
    p.add_argument("--dry-run", action="store_true", help="print the server command and exit")
    add_config_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    server = mlflow_ui(config_from_args(args), args.host, args.port, args.allowed_hosts, dry_run=args.dry_run,
                       on_start=_print_start)
    if not server.local:
        print(f"tracking URI {server.uri} is not a local store: open it directly (a tracking server serves its own UI)")
        return 0
    if args.dry_run:
        print(" ".join(server.cmd))
        return 0
    return int(server.returncode or 0)


def _print_start(server: UiServer) -> None:
    shown = "127.0.0.1" if server.host in ("0.0.0.0", "::") else server.host
    print(f"MLflow UI: http://{shown}:{server.port}  (store {server.uri}; Ctrl-C to stop)", flush=True)
