"""`stence ui`: the MLflow UI on the local tracking store (runs, sweeps, plots, registered models)."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
from pathlib import Path
from urllib.parse import unquote

from stence.commands._common import RAW, add_config_args, config_from_args

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


def server_command(uri: str, host: str, port: int, allowed_hosts: str | None = None) -> list[str]:
    """`mlflow server` on a SQLite store, artifacts beside the database (as `tracking.artifact_location`)."""
    db = Path(unquote(uri[len("sqlite:///"):].split("?", 1)[0]))
    artifacts = (db.parent / "mlartifacts").as_uri()
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri,
           "--default-artifact-root", artifacts, "--artifacts-destination", artifacts,
           "--host", host, "--port", str(port), "--workers", "1"]
    if allowed_hosts:
        cmd += ["--allowed-hosts", allowed_hosts]
    return cmd


def run(args: argparse.Namespace) -> int:
    from stence.tracking.client import resolve_tracking_uri

    uri = resolve_tracking_uri(config_from_args(args))
    if not uri.startswith("sqlite:///"):
        print(f"tracking URI {uri} is not a local store: open it directly (a tracking server serves its own UI)")
        return 0
    cmd = server_command(uri, args.host, args.port, args.allowed_hosts)
    if args.dry_run:
        print(" ".join(cmd))
        return 0
    Path(unquote(uri[len("sqlite:///"):].split("?", 1)[0])).parent.mkdir(parents=True, exist_ok=True)
    shown = "127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host
    print(f"MLflow UI: http://{shown}:{args.port}  (store {uri}; Ctrl-C to stop)", flush=True)
    return serve(cmd)


def _stop_group(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    """TERM the server's whole process group (mlflow server runs uvicorn as a child), then KILL."""
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def serve(cmd: list[str]) -> int:
    """Run the server in its own process group until it exits or we get Ctrl-C / SIGTERM."""
    proc = subprocess.Popen(cmd, start_new_session=True)

    def _on_term(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, _on_term)
    try:
        return proc.wait()
    except KeyboardInterrupt:
        _stop_group(proc)
        return 0
    finally:
        signal.signal(signal.SIGTERM, previous)
