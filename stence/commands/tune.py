"""`stence tune`: a Ray Tune + Optuna sweep of StenCE pretraining; every trial a Ray Train (DDP) run tracked
as a nested MLflow run; the best encoder is probed, logged and registered (champion only if it wins)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from stence.commands._common import RAW, add_config_args, add_run_args, config_from_args
from stence.config import THRESHOLD_TASKS

EXAMPLE = """example:
  stence tune --config my.yaml --space default --num-samples 40 --max-concurrent 4
  stence tune --config my.yaml --num-samples 64 --budget 64      # stop after 64 trial-epochs in all
  stence tune --config my.yaml --space ablation                 # the paper's W_Sten / frozen-no-CLS table
  stence tune --resume runs/ray/sweeps/<name>                   # continue an interrupted sweep
  stence tune --config my.yaml --search random --scheduler none # random search, every trial to the end
  stence tune --config my.yaml --space my_space.yaml            # a search space of your own
Built-in spaces (tune/space_files/*.yaml): default (loss.w_sten, loss.temperature, optim.lr_ecg,
optim.lr_angio), ablation, smoke. A space file (.yaml/.yml) has their schema:
  kind: search                   # or `kind: variants` with `variants: [{loss.w_sten: 0.0}, ...]`
  params:                        # dotted config keys; uniform, loguniform, int (inclusive) or categorical
    loss.w_sten: {type: uniform, low: 0.0, high: 1.0}
    optim.lr_ecg: {type: loguniform, low: 1.0e-5, high: 1.0e-3}
    model.contract: {type: categorical, values: [paper, native]}
  points_to_evaluate:            # optional, tried first
    - {loss.w_sten: 0.3}
A bad file is refused before anything starts: one line naming the key, exit code 2."""


def trial_epochs(text: str) -> int:
    """--budget: a whole number of trial-epochs, at least 1 (argparse turns the error into exit code 2)."""
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number of trial-epochs: {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1 trial-epoch, got {n}")
    return n


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tune", help="sweep W_Sten, temperature and learning rates (Tune + Optuna)",
                       description=__doc__, epilog=EXAMPLE, formatter_class=RAW)
    p.add_argument("--space", default="default", metavar="NAME_OR_FILE",
                   help="a built-in space (default, ablation, smoke) or a .yaml/.yml space file (see below)")
    p.add_argument("--num-samples", type=int, default=8, help="trials (fixed spaces run each variant once)")
    p.add_argument("--max-concurrent", type=int, default=None, help="default: what the cluster's CPUs/GPUs allow")
    p.add_argument("--scheduler", choices=("asha", "none"), default="asha", help="early stopping on the kNN AUROC")
    p.add_argument("--search", choices=("tpe", "random"), default="tpe",
                   help="Optuna sampler: TPE or random (kept on --resume)")
    p.add_argument("--budget", type=trial_epochs, default=None, metavar="TRIAL_EPOCHS",
                   help="end the sweep once this many epochs were reported over all trials (early-stopped "
                   "trials cost only the epochs they ran); default: no budget, --num-samples trials. "
                   "Kept with the sweep: --resume goes on with the budget and what is left of it")
    p.add_argument("--resume", default=None, metavar="PATH", help="Tune experiment folder of an interrupted sweep")
    p.add_argument("--sweep-name", default=None, help="sweep name (default: train.name-space)")
    p.add_argument("--register-task", default=None, help="threshold task of the registered stenosis head "
                   "(default: downstream.task)")
    p.add_argument("--no-register", action="store_true", help="do not probe/register the best encoder")
    p.add_argument("--strict", action="store_true", help="promote only if the bootstrap lower bound beats the "
                   "champion")
    p.add_argument("--seed", type=int, default=0, help="sampler seed (TPE or random)")
    p.add_argument("--tasks", nargs="+", default=list(THRESHOLD_TASKS), metavar="TASK",
                   help="threshold tasks each ablation variant is probed on (default: the four of Fig. 2)")
    add_config_args(p)
    add_run_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    # Imports inside run(): `stence --help` imports every command module, and these pull in Ray, Optuna, torch
    # and MLflow. The space file is checked first, before any of them loads.
    from stence.tune.spaces import SpaceError, load_space

    try:  # first, before Ray, MLflow or the features: a bad file costs nothing
        space = load_space(args.space)
    except SpaceError as e:
        print(f"stence tune: {e}", file=sys.stderr)
        return 2
    from stence.train.pretrain_loop import KNN_METRIC, SELECT_METRIC
    from stence.tune.pipeline import sweep_pipeline

    cfg = config_from_args(args)
    name = args.sweep_name or f"{cfg.train.name}-{space.stem}"
    out = sweep_pipeline(cfg, space, name=name, num_samples=args.num_samples, max_concurrent=args.max_concurrent,
                         scheduler=args.scheduler, search=args.search, seed=args.seed, resume=args.resume,
                         tasks=args.tasks, register=not args.no_register, register_task=args.register_task,
                         strict=args.strict, budget=args.budget)
    result = out.result
    if result.summary is not None:  # trials sorted by the objective, importances (also in the parent run)
        print((Path(result.path) / "summary" / "trials.md").read_text())
    else:
        cols = [c for c in result.results.columns if c.startswith("config/") or c in (SELECT_METRIC, KNN_METRIC, "trial_id")]
        print(result.results[cols].to_string(index=False))
    print(f"best trial {result.best_trial_id}: {SELECT_METRIC} {result.best_metric:.3f} "
          f"with {result.best_overrides}")
    print(f"sweep folder (for --resume): {result.path}")
    if not result.complete:
        print("the sweep was interrupted: resume it with --resume")
        return 1
    if out.ablation is not None:
        print((Path(out.ablation["out"]) / "results.md").read_text())
        print(f"ablation table, Fig. 2 and paired DeLong tests: {out.ablation['out']}")
    reg = out.registration
    if reg is not None:
        print(f"registered {reg['name']} version {reg['version']} (val AUROC {reg['val_auroc']:.3f} "
              f"[{reg['val_auroc_lo']:.3f}, {reg['val_auroc_hi']:.3f}]); "
              f"{'now champion' if reg['promoted'] else 'champion unchanged'}")
    return 0
