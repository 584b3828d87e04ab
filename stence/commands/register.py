"""`stence register RUN_ID_OR_SCORER`: log a scorer as an MLflow model, register a new version with its
provenance, and move the `champion` alias if it beats the current champion on the same metric and cohort."""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from stence.commands._common import RAW, add_config_args, config_from_args

if TYPE_CHECKING:
    from stence.config import Config

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


def _run_for_file(cfg: Config, scorer: Path, meta: dict) -> str:
    """A FINISHED run to own a scorer that came as a file: the scorer's own config, this CLI's tracking."""
    from dataclasses import replace

    from stence.config import ConfigError, from_dict
    from stence.tracking.client import resolve_tracking_uri
    from stence.tracking.runs import Tracker, start_run
    from stence.tracking.tags import SCORER_PATH_TAG, STAGE_TAG

    try:
        run_cfg = replace(from_dict(meta["config"]), tracking=cfg.tracking) if meta.get("config") else cfg
    except (ConfigError, TypeError, ValueError):
        run_cfg = cfg
    run_id = start_run(run_cfg, f"register-{scorer.parent.name}",
                       tags={STAGE_TAG: "register", SCORER_PATH_TAG: str(scorer.resolve())})
    Tracker(resolve_tracking_uri(cfg), run_id).end("FINISHED")
    return run_id


def run(args: argparse.Namespace) -> int:
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    from stence.models.scorer import scorer_metadata
    from stence.pipelines.register import promote, register_scorer, run_tags
    from stence.serving.fetch import fetch_scorer
    from stence.tracking.client import resolve_tracking_uri
    from stence.tracking.tags import (
        CODE_COMMIT_TAG,
        COHORT_FINGERPRINT_TAG,
        CONFIG_HASH_TAG,
        METRIC_INTERVAL_TAG,
        METRIC_TAG,
        SWEEP_TAG,
    )

    cfg = config_from_args(args)
    uri = resolve_tracking_uri(cfg)
    name = args.name or cfg.tracking.registered_model
    with tempfile.TemporaryDirectory(prefix="stence-register-") as tmp:
        src = args.source
        try:
            scorer = fetch_scorer(src, tmp, uri=uri)
            meta = scorer_metadata(scorer)
        except Exception as e:  # unknown run id, no scorer in the run, unreadable file
            print(f"error: cannot find a scorer in {src!r} (tracking URI {uri}): {e}")
            return 1
        if Path(src).expanduser().exists():
            run_id = _run_for_file(cfg, scorer, meta)
        else:
            run_id = src[len("runs:/"):].split("/", 1)[0] if src.startswith("runs:/") else src
        sweep = run_tags(cfg, run_id).get(SWEEP_TAG)
        try:
            done = register_scorer(cfg, scorer, run_id, name, args.metric, {SWEEP_TAG: sweep} if sweep else None)
        except ValueError as e:
            print(f"error: {e}")
            return 1
    tags = done.tags
    print(f"registered {name} version {done.version} from run {run_id} ({done.model_uri})")
    print(f"  {tags[METRIC_TAG]} {tags[METRIC_INTERVAL_TAG]}; cohort {tags[COHORT_FINGERPRINT_TAG]}; "
          f"config {tags[CONFIG_HASH_TAG]}; commit {tags[CODE_COMMIT_TAG][:12]}")
    promote(cfg, done, alias=args.alias, strict=args.strict, force=args.force)
    print(f"  {done.decision}")
    if not done.promoted:
        print(f"  (use --force to make version {done.version} the {args.alias} anyway)")
    return 0
