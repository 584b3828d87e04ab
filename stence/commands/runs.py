"""`stence runs`: catch MLflow up after trouble. `replay` sends what trackers buffered while the tracking store
was down or locked (spool files); `repair` ends the runs left RUNNING by a driver that died (SIGKILL, lost
machine): a sweep that will be resumed does this itself (`stence tune --resume`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from stence.commands._common import RAW, add_config_args, config_from_args
from stence.pipelines.runs import NoSuchSpool, replay_paths
from stence.tracking.replay import ReplayStats

EXAMPLE = """example:
  stence runs replay runs/ray/stence-pretrain/mlflow_spool.jsonl   # what the warning at the end of a run names
  stence runs replay runs/ray                                       # every spool file under a folder
  stence runs repair --sweep stence-default --dry-run               # show what would be ended, and why
  stence runs repair --sweep stence-default                         # a SIGKILLed sweep that will not be resumed
  stence runs repair --older-than 120                               # also runs driven from other machines
A run is ended only when its driver (host and process recorded in the tag stence.driver) is gone; a driver on
another machine cannot be checked, so such a run needs --older-than (no heartbeat for that many minutes).
Parents and interrupted trials end KILLED; a trial Tune had finished ends FINISHED, one that errored FAILED."""


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("runs", help="replay buffered tracking; end runs orphaned by a dead driver",
                       description=__doc__, epilog=EXAMPLE, formatter_class=RAW)
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    r = actions.add_parser("replay", help="send buffered metrics, params, tags and statuses to MLflow",
                           formatter_class=RAW)
    r.add_argument("paths", nargs="+", metavar="PATH", help="spool file, or folder searched for mlflow_spool.jsonl")
    f = actions.add_parser("repair", help="end RUNNING runs whose driver is gone", formatter_class=RAW)
    f.add_argument("--sweep", default=None, metavar="NAME", help="only the runs of this sweep (its --sweep-name)")
    f.add_argument("--older-than", type=float, default=None, metavar="MIN",
                   help="only runs idle this many minutes; also ends those whose driver cannot be checked here")
    f.add_argument("--experiment", default=None, help="MLflow experiment (default: tracking.experiment)")
    f.add_argument("--dry-run", action="store_true", help="list what would be ended, change nothing")
    add_config_args(f)
    p.set_defaults(func=run)


def _print_replay(spool: Path, stats: ReplayStats) -> None:
    print(f"{spool}: applied {stats.applied} items to runs {', '.join(sorted(stats.runs)) or '-'}; skipped "
          f"{stats.skipped_steps} metric steps the runs already had; dropped {len(stats.dropped)}"
          + (f"; {stats.pending} still pending: {stats.error}" if stats.pending else ""))
    for rid, why in stats.dropped.items():
        print(f"  dropped {rid}: {why}")


def _replay(args: argparse.Namespace) -> int:
    try:
        done = replay_paths(args.paths, report=_print_replay)
    except NoSuchSpool as e:
        raise SystemExit(str(e)) from e
    if done.pending:
        print(f"{done.pending} items still pending: run this again once the tracking store answers")
        return 1
    print("nothing pending: every buffered item is in MLflow")
    return 0


def _repair(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    # the sweep's repair (stence.tune) pulls in Ray Tune: imported here so `stence --help` stays fast
    from stence.tune.trial_runs import repair_configured

    experiment, ended, kept = repair_configured(cfg, args.experiment, sweep=args.sweep,
                                                older_than_min=args.older_than, dry_run=args.dry_run)
    verb = "would end" if args.dry_run else "ended"
    for r in ended:
        print(f"{verb} {r.name} ({r.run_id}) {r.status}: {r.reason}")
    for run, why in kept:
        print(f"left RUNNING {run.info.run_name} ({run.info.run_id}): {why}")
    if not ended:
        print(f"nothing to repair in experiment {experiment!r}" + (f" (sweep {args.sweep})" if args.sweep else ""))
    return 0


def run(args: argparse.Namespace) -> int:
    return _replay(args) if args.action == "replay" else _repair(args)
