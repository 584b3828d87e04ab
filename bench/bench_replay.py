"""Searcher comparison by replay: TPE + ASHA, TPE, random + ASHA and random search on recorded learning curves.

The table (bench/curves/*.csv.gz, made by `python -m bench.record_curves`) holds the per-epoch objective of
every configuration of a grid over the search space, some of them over several training seeds. Each arm is
replayed (bench/replay.py: the live sweep's OptunaSearch and ASHAScheduler objects, the table in place of
training) over --seeds sampler seeds at the same budget of trial-epochs. Reported per arm: the median and
interquartile range of the trial-epochs needed to come within --tol of the table's best value (a run that
never does counts as budget + 1 and is counted apart), and of the best value found at fixed budgets. The
headline is TPE + ASHA's median against random search's (target <= 0.40). Before the replay, the objective's
seed-to-seed noise is set against the spread between configurations (bench/curve_noise.py).

Usage: python -m bench.bench_replay [--table bench/curves/default.csv.gz] [--objective val/knn_auroc_smooth]
       [--seeds 50] [--budget N] [--concurrency 2] [--out bench/results/replay.json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from bench.curve_noise import noise_report
from bench.replay import ARMS, CurveTable, replay
from stence.tune.budget import trial_epochs_to_within
from stence.tune.search import startup_trials
from stence.tune.spaces import load_space

TARGET_RATIO = 0.40
DEFAULT_TABLE = "bench/curves/default.csv.gz"


def quartiles(xs: list[float]) -> dict[str, float]:
    q1, med, q3 = (float(v) for v in np.percentile(np.asarray(xs, dtype=float), [25, 50, 75]))
    return {"median": med, "q1": q1, "q3": q3}


def arm_stats(runs: list[Any], budget: int, target: float, tol: float, fixed: list[int]) -> dict[str, Any]:
    """Trial-epochs to within `tol` of `target` (never reached: budget + 1) and best values at fixed budgets."""
    reach = [trial_epochs_to_within(r.curve, target, tol) for r in runs]
    to_within = [budget + 1 if x is None else x for x in reach]
    out: dict[str, Any] = {"trial_epochs_to_within": quartiles(to_within),
                           "reached": sum(x is not None for x in reach), "runs": len(runs),
                           "trials": quartiles([r.trials for r in runs]),
                           "stopped_early": quartiles([r.stopped_early for r in runs])}  # fmt: skip
    out["best_at"] = {str(b): quartiles([r.curve[b - 1] for r in runs]) for b in fixed}
    return out


def compare(table: CurveTable, space: Any, *, seeds: int, budget: int, concurrency: int, n_startup: int,
            reduction_factor: float, tol: float, seed0: int = 0) -> dict[str, Any]:
    target = table.best()
    fixed = sorted({max(1, budget // 4), max(1, budget // 2), budget})
    arms: dict[str, Any] = {}
    for arm in ARMS:
        t0 = time.perf_counter()
        runs = [replay(table, space, arm, seed0 + s, budget, concurrency=concurrency, n_startup=n_startup,
                       reduction_factor=reduction_factor) for s in range(seeds)]  # fmt: skip
        arms[arm] = arm_stats(runs, budget, target, tol, fixed)
        arms[arm]["wall_s"] = round(time.perf_counter() - t0, 1)
    med = {a: arms[a]["trial_epochs_to_within"]["median"] for a in arms}
    ratio = med["tpe_asha"] / med["random"] if med["random"] else math.nan
    return {"target": target, "fixed_budgets": fixed, "arms": arms, "ratio_tpe_asha_vs_random": ratio,
            "target_ratio": TARGET_RATIO, "target_met": bool(ratio <= TARGET_RATIO)}


def print_table(res: dict[str, Any], budget: int, tol: float) -> None:
    print(f"\ntable best {res['target']:.4f}; budget {budget} trial-epochs; tol {tol}")
    b = res["fixed_budgets"]
    head = f"{'arm':<12} {'to within tol: median [IQR]':<30} {'reached':>8}  " + "  ".join(
        f"{'best@' + str(x):>22}" for x in b)
    print(head)
    for arm, s in res["arms"].items():
        t = s["trial_epochs_to_within"]
        cells = "  ".join(f"{v['median']:.4f} [{v['q1']:.4f},{v['q3']:.4f}]".rjust(22)
                          for v in (s["best_at"][str(x)] for x in b))  # fmt: skip
        print(f"{arm:<12} {t['median']:>6.1f} [{t['q1']:.1f}, {t['q3']:.1f}]".ljust(43)
              + f" {s['reached']:>4}/{s['runs']:<3}  {cells}")
    print(f"TPE + ASHA / random (median trial-epochs): {res['ratio_tpe_asha_vs_random']:.2f} "
          f"(target <= {TARGET_RATIO:.2f}: {'met' if res['target_met'] else 'NOT met'})")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--table", default=DEFAULT_TABLE)
    p.add_argument("--space", default="default", help="the space the table was recorded on")
    p.add_argument("--objective", default="val/knn_auroc_smooth",
                   help="the table column the sweep maximises; a leading '-' minimises it (-val/clip_loss)")
    p.add_argument("--seeds", type=int, default=50, help="sampler seeds per arm")
    p.add_argument("--budget", type=int, default=None, help="trial-epochs per run (default: 8 full trials)")
    p.add_argument("--concurrency", type=int, default=2, help="trials at once, as on the 2-core machine")
    p.add_argument("--reduction-factor", type=float, default=4)
    p.add_argument("--n-startup", type=int, default=None,
                   help="TPE start-up trials (default: stence tune's rule for the trials random search runs)")
    p.add_argument("--tol", type=float, default=0.01)
    p.add_argument("--out", default="bench/results/replay.json")
    args = p.parse_args(argv)
    df = pd.read_csv(args.table)
    space = load_space(args.space)
    column = args.objective.lstrip("-")
    objective = df.assign(objective=-df[column] if args.objective.startswith("-") else df[column])
    table = CurveTable.from_frame(objective, space, "objective")
    budget = args.budget or 8 * table.epochs
    n_startup = args.n_startup or startup_trials(budget // table.epochs, args.concurrency)
    noise = noise_report(df, list(space.data["params"]))
    res = compare(table, space, seeds=args.seeds, budget=budget, concurrency=args.concurrency,
                  n_startup=n_startup, reduction_factor=args.reduction_factor, tol=args.tol)
    print("objective noise (same config, different training seeds) against the spread between configs:")
    for name, r in noise.items():
        print(f"  {name:<28} seed sd {r['seed_sd']:.4f}  between-config sd {r['config_sd']:.4f}  "
              f"ratio {r['noise_to_spread']:.2f}")
    print_table(res, budget, args.tol)
    out = {"benchmark": "search_replay", "table": args.table, "objective": args.objective,
           "settings": {"seeds": args.seeds, "budget": budget, "concurrency": args.concurrency,
                        "n_startup": n_startup, "reduction_factor": args.reduction_factor, "tol": args.tol,
                        "epochs": table.epochs, "configs": len(table.curves),
                        "runs": sum(len(v) for v in table.curves.values())},
           "noise": noise, "result": res,
           "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()}}  # fmt: skip
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1, default=float))
    print(f"wrote {args.out}")
    return out


if __name__ == "__main__":
    main()
