"""`stence register RUN_ID_OR_SCORER`: log a scorer as an MLflow model, register a new version with its
provenance, and move the `champion` alias if it beats the current champion on the same metric and cohort."""

from __future__ import annotations

import argparse
import os
from typing import TYPE_CHECKING

from stence.commands._common import RAW, add_config_args, config_from_args
from stence.tracking.tags import (
    CODE_COMMIT_TAG,
    COHORT_FINGERPRINT_TAG,
    CONFIG_HASH_TAG,
    METRIC_INTERVAL_TAG,
    METRIC_TAG,
)

if TYPE_CHECKING:
    from stence.pipelines.register import Registered

EXAMPLE = """examples:
  stence register 3f2c9a...e1                      # a run whose artifacts hold scorer.pt (stence probe)
  stence register runs/ray/exports/probe-stence-probe-0_100/scorer.pt --strict
  stence register 3f2c9a...e1 --force              # move champion by hand, whatever the metrics say

Promotion compares "<task>/<metric>" (default auroc, from the scorer's bootstrap metrics) on the same
cohort fingerprint; --strict requires the new lower bound to beat the champion's value."""


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("register", help="register a scorer as a model version; promote it if better",
                       description=__doc__, epilog=EXAMPLE, formatter_class=RAW)
    p.add_argument("source", metavar="RUN_ID_OR_SCORER",
                   help="MLflow run id (or runs:/RUN_ID) whose artifacts hold scorer.pt, or a scorer file/folder")
    p.add_argument("--name", default=None, help="registered model (default: tracking.registered_model)")
    p.add_argument("--alias", default="champion", help="alias to move when the version is better")
    p.add_argument("--metric", default="auroc", help="scorer metric to compare (auroc, auprc)")
    p.add_argument("--strict", action="store_true",
                   help="promote only if the bootstrap lower bound beats the champion's value")
    p.add_argument("--force", action="store_true", help="move the alias without comparing")
    add_config_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    cfg = config_from_args(args)
    # the pipeline pulls in torch and MLflow: imported here so `stence --help` stays fast
    from stence.pipelines.register import RegisterError, register_source

    try:
        done = register_source(cfg, args.source, args.name, metric=args.metric, alias=args.alias,
                               strict=args.strict, force=args.force, on_registered=_print_registered)
    except RegisterError as e:  # no scorer there, or none with the metric: one line, exit 1
        print(f"error: {e}")
        return 1
    print(f"  {done.decision}")
    if not done.promoted:
        print(f"  (use --force to make version {done.version} the {args.alias} anyway)")
    return 0


def _print_registered(done: Registered) -> None:
    """What was registered, before the promotion is decided."""
    tags = done.tags
    print(f"registered {done.name} version {done.version} from run {done.run_id} ({done.model_uri})")
    print(f"  {tags[METRIC_TAG]} {tags[METRIC_INTERVAL_TAG]}; cohort {tags[COHORT_FINGERPRINT_TAG]}; "
          f"config {tags[CONFIG_HASH_TAG]}; commit {tags[CODE_COMMIT_TAG][:12]}")
