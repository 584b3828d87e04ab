"""`stence models`: registered versions of the model, their metric, and which one is `champion`."""

from __future__ import annotations

import argparse
import json

from stence.commands._common import RAW, add_config_args, config_from_args

EXAMPLE = """example:
  stence models                                   # versions of tracking.registered_model
  stence models --name stence-ecg-encoder --json
  stence models --set tracking.uri=http://mlflow.internal:5000"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list registered model versions and the champion",
                       description=__doc__, epilog=EXAMPLE, formatter_class=RAW)
    p.add_argument("--name", default=None, help="registered model (default: tracking.registered_model)")
    p.add_argument("--json", action="store_true", help="print the rows as JSON")
    add_config_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    # the pipeline pulls in torch and MLflow: imported here so `stence --help` stays fast
    from stence.pipelines.register import registered_versions

    found = registered_versions(cfg, args.name)
    name, uri, rows = found.name, found.uri, found.rows
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print(f"no registered versions of {name!r} at {uri}; register one with `stence register RUN_ID`")
        return 0
    print(f"{name} at {uri}")
    print(f"{'version':>7}  {'aliases':<16} {'metric':<36} {'created':<19}  run id")
    for r in rows:
        aliases = ",".join(r["aliases"]) or "-"
        print(f"{r['version']:>7}  {aliases:<16} {r['metric'] or '-':<36} {r['created']:<19}  {r['run_id']}")
    return 0
