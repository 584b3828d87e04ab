"""Sweep efficiency: Optuna TPE + ASHA against random search, at an equal budget of trial-epochs.

Both arms sweep the same space (tune/space_files/default.yaml) over the real StenCE pretraining driver
(`stence.pipelines.pretrain.run_pretrain`: every trial a Ray Train run, the kNN validation AUROC reported once
per epoch) on the synthetic cohort, through the same `tune.sweep.run_sweep` code path:

  random     Optuna RandomSampler, no early stopping: every trial runs --epochs epochs
  tpe_asha   Optuna TPESampler + ASHA (grace 1, max_t --epochs, --reduction-factor)

Each arm stops once it has spent --budget trial-epochs (one reported result = one trial-epoch; a Tune
Stopper counts them). For each arm: the best-so-far curve of the val AUROC against trial-epochs, its best,
and the trial-epochs at which it first comes within --tol of max(best random, best TPE+ASHA). Target: TPE
+ ASHA needs <= 40 % of random search's trial-epochs. With --repeats R both arms run R times (sampler seeds
--seed .. --seed+R-1) and the median ratio is reported.

Fairness: the same space, trial config (training seed included), sampler seed, worker count and
concurrency in both arms. With the same seed, Optuna's RandomSampler and TPE's random start-up phase
(--n-startup trials) draw the same configurations in the same order: a paired design, so TPE+ASHA first
screens the very configurations random search trains in full, then TPE takes over. The space's
points_to_evaluate (the paper's setting) is dropped from both by default (--paper-point drop), so the
comparison is between the searches and not a shared hand-picked head start; --paper-point keep evaluates
it first in both. Worker count and concurrency (default 1 worker per trial, 2 trials at once) are the same
for both: on 2 cores a trial's start-up (a Ray Train worker group, ~20-50 s) costs more than an epoch of
the demo model, so two 1-worker trials overlapping beat one 2-worker DDP trial at a time.

Data: --runs DIR uses a demo run folder (DIR/cohort and the stage-A exports in
DIR/ray/exports/angio-demo-angio; the cohort is copied into the work folder, DIR is only read); without it
a demo cohort is prepared as scripts/demo.sh steps 1-4 do (synth, ingest, train-angio, features).

Usage: python -m bench.bench_search [--runs DIR] [--budget 64] [--epochs 8] [--trials-random N]
       [--repeats 1] [--out bench/results/search.json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from stence.config import load_config
from stence.pipelines.pretrain import run_pretrain
from stence.train.driver import ensure_ray, shutdown_ray
from stence.train.features import extract_features
from stence.train.pretrain_loop import KNN_METRIC
from stence.tune.budget import ResultLog, TrialEpochBudget, best_so_far, trial_epochs_to_within
from stence.tune.spaces import SPACES, get_space
from stence.tune.sweep import run_sweep

ROOT = Path(__file__).resolve().parents[1]
DEMO_CONFIG = ROOT / "configs" / "demo.yaml"
ANGIO_EXPORT = Path("ray") / "exports" / "angio-demo-angio"  # stage-A exports inside a demo run folder
TARGET_RATIO = 0.40
ARMS = {  # arm -> (Optuna sampler, Tune scheduler)
    "random": ("random", "none"),
    "tpe_asha": ("tpe", "asha"),
}


# ---------------------------------------------------------------------------------------------------
# pure: curves and the comparison


def compare_arms(
    values: dict[str, Sequence[float]], budget: int, tol: float = 0.01, mode: str = "max"
) -> dict[str, Any]:
    """Compare arms from their metric values in arrival order (one per trial-epoch).

    Each arm's values are cut at `budget`; its best-so-far curve, best value and the trial-epochs at
    which the curve first comes within `tol` of the best of all arms are returned, with the ratio
    tpe_asha / random. An arm that never comes within `tol` gets None; if that arm is random, its
    trial-epochs are censored at its length (it needs more), and the ratio uses that length: an upper
    bound, flagged by "random_censored".
    """
    arms: dict[str, dict[str, Any]] = {}
    for arm, vals in values.items():
        curve = best_so_far(list(vals)[:budget], mode)
        finite = [v for v in curve if math.isfinite(v)]
        arms[arm] = {
            "curve": curve,
            "best": finite[-1] if finite else float("nan"),
            "trial_epochs": len(curve),
        }
    bests = [a["best"] for a in arms.values() if math.isfinite(a["best"])]
    if not bests:
        raise ValueError("no arm reported a finite metric")
    target = max(bests) if mode == "max" else min(bests)
    for a in arms.values():
        a["to_within"] = trial_epochs_to_within(a["curve"], target, tol, mode)
    out: dict[str, Any] = {
        "target": target,
        "tol": tol,
        "arms": arms,
        "ratio": None,
        "random_censored": False,
    }
    if "random" in arms and "tpe_asha" in arms:
        tpe, rnd = arms["tpe_asha"]["to_within"], arms["random"]["to_within"]
        if rnd is None:
            out["random_censored"] = True
            rnd = arms["random"]["trial_epochs"]
        out["ratio"] = None if tpe is None or not rnd else tpe / rnd
    return out


def median_ratio(ratios: Sequence[float | None]) -> float | None:
    """Median over repeats; a repeat whose TPE+ASHA arm never came within tol counts as +inf."""
    vals = [math.inf if r is None else float(r) for r in ratios]
    if not vals:
        return None
    m = statistics.median(vals)
    return None if math.isinf(m) else m


# ---------------------------------------------------------------------------------------------------
# preparation


def _stence(*args: str, env: dict[str, str]) -> None:
    cmd = [sys.executable, "-m", "stence.cli", *args]
    print("$ stence " + " ".join(args), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT, env=env)


def work_cohort(runs_arg: str | None, work: Path, tracking_uri: str) -> tuple[Path, Path]:
    """(demo run folder, cohort) for a benchmark working in `work`: the cohort of `runs_arg` copied into
    `work` (the given folder stays untouched), or, without one, a demo run prepared in `work/demo`."""
    if runs_arg:
        runs = Path(runs_arg).resolve()
        if not (work / "cohort").exists():
            shutil.copytree(runs / "cohort", work / "cohort")
        return runs, work / "cohort"
    runs = prepare_demo_run(work / "demo", tracking_uri)
    return runs, runs / "cohort"


def prepare_demo_run(runs: Path, tracking_uri: str) -> Path:
    """A demo run folder made as scripts/demo.sh steps 1-3 make it (step 4, the features, is done by the
    caller): synthetic demo cohort with 5 % corrupt files, ingest, stage-A training. Reused if complete."""
    if (runs / ANGIO_EXPORT / "frame_encoder.pt").exists():
        return runs
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
    env.setdefault("STENCE_SALT", "bench-secret")
    cfg = ["--config", str(DEMO_CONFIG), "--set", f"data.cohort={runs / 'cohort'}",
           f"train.storage_path={runs / 'ray'}", f"tracking.uri={tracking_uri}"]  # fmt: skip
    _stence("synth", str(runs / "raw"), "--size", "demo", "--corrupt-fraction", "0.05", "--seed", "0",
            "--overwrite", env=env)  # fmt: skip
    _stence("ingest", str(runs / "raw"), "--out", str(runs / "cohort"), env=env)
    _stence("train-angio", *cfg, "--name", "demo-angio", "--workers", "0", "--set", "optim.epochs=150",
            "optim.batch_size=8", "optim.lr_angio=1e-3", env=env)  # fmt: skip
    return runs


def bench_config(cohort: Path, runs: Path, work: Path, epochs: int, workers: int, tracking_uri: str) -> Any:
    """configs/demo.yaml with the stage-A exports of `runs`, the cohort copy, and the bench's own storage,
    MLflow store, epochs and workers."""
    angio = runs / ANGIO_EXPORT
    return load_config(str(DEMO_CONFIG), [
        f"data.cohort={cohort}", f"train.storage_path={work / 'ray'}", f"train.workers={workers}",
        f"optim.epochs={epochs}", "train.knn_every=1", "train.name=bench-search",
        f"model.angio_checkpoint={angio / 'aggregator.pt'}",
        f"feature.frame_checkpoint={angio / 'frame_encoder.pt'}",
        f"tracking.uri={tracking_uri}", "tracking.experiment=bench-search",
    ])  # fmt: skip


def bench_space(space: str, paper_point: str) -> str:
    """The name of the space both arms sweep: `space` itself, or (paper_point="drop") a copy of it without
    points_to_evaluate, registered for this process (the trials never look the space up)."""
    if paper_point == "keep":
        return space
    name = f"{space}-nopoints"
    SPACES[name] = {**get_space(space), "points_to_evaluate": []}
    return name


# ---------------------------------------------------------------------------------------------------
# one arm


def run_arm(arm: str, cfg: Any, *, space: str, budget: int, epochs: int, trials_random: int, seed: int,
            max_concurrent: int, reduction_factor: float, n_startup: int,
            name: str) -> dict[str, Any]:  # fmt: skip
    """One sweep limited to `budget` trial-epochs; its results in arrival order and a summary."""
    search, scheduler = ARMS[arm]
    stopper, log = TrialEpochBudget(budget), ResultLog(KNN_METRIC)
    # random: exactly its trials of `epochs` epochs; TPE+ASHA: as many trials as the budget allows
    num_samples = trials_random if arm == "random" else budget
    t0 = time.perf_counter()
    result = run_sweep(run_pretrain, cfg, space=space, num_samples=num_samples, max_concurrent=max_concurrent,
                       scheduler=scheduler, search=search, metric=KNN_METRIC, mode="max", seed=seed,
                       name=name,
                       max_t=epochs, reduction_factor=reduction_factor, n_startup_trials=n_startup,
                       callbacks=[log], stop=stopper)  # fmt: skip
    wall = time.perf_counter() - t0
    trials = {r["trial_id"] for r in log.records[:budget]}
    per_trial = {t: sum(r["trial_id"] == t for r in log.records[:budget]) for t in trials}
    return {
        "search": search,
        "scheduler": scheduler,
        "num_samples": num_samples,
        "wall_s": round(wall, 1),
        "trials": len(trials),
        "epochs_per_trial": sorted(per_trial.values(), reverse=True),
        "results_reported": len(log.records),
        "records": log.records,
        "configs": log.configs,
        "best_trial": result.best_trial_id,
        "best_overrides": result.best_overrides,
        "sweep_path": result.path,
    }


# ---------------------------------------------------------------------------------------------------


def _fmt(x: float | None, spec: str = ".3f") -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def print_table(repeats: list[dict[str, Any]], budget: int, tol: float) -> None:
    print(
        f"\nbudget {budget} trial-epochs per arm; 'to within' = trial-epochs until best-so-far >= "
        f"max(best random, best TPE+ASHA) - {tol}"
    )
    print(
        f"{'seed':>4}  {'arm':<9} {'trials':>6} {'t-epochs':>8} {'best AUROC':>10} {'target':>7} "
        f"{'to within':>9} {'wall s':>7}"
    )
    for rep in repeats:
        cmp = rep["comparison"]
        for arm in ARMS:
            a, c = rep["arms"][arm], cmp["arms"][arm]
            within = _fmt(c["to_within"], "d") + ("+" if arm == "random" and cmp["random_censored"] else "")
            print(
                f"{rep['seed']:>4}  {arm:<9} {a['trials']:>6} {c['trial_epochs']:>8} {_fmt(c['best']):>10} "
                f"{_fmt(cmp['target']):>7} {within:>9} {a['wall_s']:>7.0f}"
            )
        print(f"{'':>4}  ratio TPE+ASHA / random = {_fmt(cmp['ratio'], '.2f')}")


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", default=None, help="demo run folder to take the cohort and stage-A exports from "
                   "(read only); default: prepare one in the work folder")  # fmt: skip
    p.add_argument("--work", default=None, help="work folder (default: a temporary one, removed afterwards)")
    p.add_argument("--epochs", type=int, default=8, help="epochs of a full trial (random arm; ASHA max_t)")
    p.add_argument(
        "--trials-random", type=int, default=8, help="random-search trials (sets the default budget)"
    )
    p.add_argument(
        "--budget", type=int, default=None, help="trial-epochs per arm (default: trials-random x epochs)"
    )
    p.add_argument("--repeats", type=int, default=1, help="runs per arm, sampler seeds seed..seed+R-1")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=1, help="Ray Train workers per trial (both arms)")
    p.add_argument("--max-concurrent", type=int, default=2, help="trials at once (both arms)")
    p.add_argument("--reduction-factor", type=float, default=4, help="ASHA reduction factor")
    p.add_argument(
        "--n-startup",
        type=int,
        default=10,
        help="TPE's random start-up trials (stence tune: min(10, num_samples // 2))",
    )
    p.add_argument("--tol", type=float, default=0.01, help="'within tol of the best' threshold")
    p.add_argument("--space", default="default")
    p.add_argument(
        "--paper-point",
        choices=("drop", "keep"),
        default="drop",
        help="drop the space's points_to_evaluate from both arms, or evaluate them first in both",
    )
    p.add_argument("--out", default="bench/results/search.json")
    args = p.parse_args(argv)
    budget = args.budget or args.trials_random * args.epochs
    trials_random = math.ceil(budget / args.epochs)
    os.environ.setdefault("STENCE_SALT", "bench-secret")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    t_start = time.perf_counter()
    load_start = os.getloadavg()
    tmp = None
    if args.work:
        work = Path(args.work).resolve()
        work.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="bench-search-")
        work = Path(tmp.name)
    try:
        result = _run(args, work, budget, trials_random)
    finally:
        shutdown_ray()
        if tmp is not None:
            tmp.cleanup()
    result["wall_s_total"] = round(time.perf_counter() - t_start, 1)
    result["machine"]["loadavg_start_end"] = [round(load_start[0], 2), round(os.getloadavg()[0], 2)]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1, default=str))
    s = result["summary"]
    print(
        f"\nmedian ratio over {args.repeats} repeat(s): {_fmt(s['median_ratio'], '.2f')} (target <= "
        f"{TARGET_RATIO:.2f}): {'met' if s['target_met'] else 'NOT met'}"
    )
    print(f"total wall time {result['wall_s_total']:.0f} s (preparation {result['prep_wall_s']:.0f} s)")
    print(f"wrote {args.out}")
    return result


def _run(args: argparse.Namespace, work: Path, budget: int, trials_random: int) -> dict[str, Any]:
    tracking_uri = f"sqlite:///{work / 'mlflow.db'}"
    t0 = time.perf_counter()
    runs, cohort = work_cohort(args.runs, work, tracking_uri)
    cfg = bench_config(cohort, runs, work, args.epochs, args.workers, tracking_uri)
    ensure_ray()
    feats = extract_features(cfg, progress=False)  # scripts/demo.sh step 4; reused when already cached
    prep_wall = time.perf_counter() - t0
    space = bench_space(args.space, args.paper_point)

    repeats = []
    for r in range(args.repeats):
        seed = args.seed + r
        arms = {}
        for arm in ARMS:
            print(f"\n==> seed {seed}: {arm} ({budget} trial-epochs)", flush=True)
            arms[arm] = run_arm(arm, cfg, space=space, budget=budget, epochs=args.epochs,
                                trials_random=trials_random, seed=seed, max_concurrent=args.max_concurrent,
                                reduction_factor=args.reduction_factor, n_startup=args.n_startup,
                                name=f"bench-search-{arm}-s{seed}-{time.strftime('%H%M%S')}")  # fmt: skip
        cmp = compare_arms({a: [x["metric"] for x in arms[a]["records"]] for a in ARMS}, budget, args.tol)
        repeats.append({"seed": seed, "arms": arms, "comparison": cmp})
    print_table(repeats, budget, args.tol)
    ratios = [rep["comparison"]["ratio"] for rep in repeats]
    med = median_ratio(ratios)
    return {
        "benchmark": "search_efficiency",
        "settings": {
            "space": args.space,
            "space_used": space,
            "paper_point": args.paper_point,
            "budget": budget,
            "epochs": args.epochs,
            "trials_random": trials_random,
            "repeats": args.repeats,
            "seeds": [args.seed + r for r in range(args.repeats)],
            "workers_per_trial": args.workers,
            "max_concurrent": args.max_concurrent,
            "asha": {"grace_period": 1, "max_t": args.epochs, "reduction_factor": args.reduction_factor},
            "tpe_n_startup_trials": args.n_startup,
            "tol": args.tol,
            "metric": "val/knn_auroc",
            "train_seed": cfg.train.seed,
            "config": str(DEMO_CONFIG.relative_to(ROOT)),
            "runs": str(args.runs) if args.runs else "prepared",
            "features": str(feats.root),
        },  # fmt: skip
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()},
        "prep_wall_s": round(prep_wall, 1),
        "repeats": repeats,
        "summary": {
            "ratios": ratios,
            "median_ratio": med,
            "target_ratio": TARGET_RATIO,
            "target_met": med is not None and med <= TARGET_RATIO,
            "wall_s": {a: [rep["arms"][a]["wall_s"] for rep in repeats] for a in ARMS},
        },  # fmt: skip
    }


if __name__ == "__main__":
    main()
