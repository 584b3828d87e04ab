"""Record the learning curves a replay benchmark (bench/bench_replay.py) needs, through the live sweep.

A grid over the search space (--levels per parameter, at the centres of equal cells of each range, on a log
scale for log-uniform parameters: 3 levels of the default space's 4 parameters give 81 configurations) runs
as one fixed-variant sweep through `stence.tune.sweep.run_sweep` and the real pretraining driver
(`stence.pipelines.pretrain.run_pretrain`), every configuration to --epochs epochs. --noise-configs of them
(the one nearest the paper's point, then others drawn with --seed) run again with training seeds
1 .. --noise-seeds - 1, so the table also measures the objective's seed-to-seed noise. Every validation
metric each epoch reports is kept: the objective can be chosen afterwards.

The table is a gzipped CSV, one row per (configuration, training seed, epoch): the parameters, `seed`,
`epoch` and the metrics. Data: as bench/bench_search.py (--runs DIR or a demo cohort prepared in --work).

Usage: python -m bench.record_curves [--runs DIR] [--work DIR] [--levels 3] [--epochs 8]
       [--noise-configs 4] [--noise-seeds 5] [--out bench/curves/default.csv.gz]
"""

from __future__ import annotations

import argparse
import itertools
import math
import os
import random
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml
from ray import tune

from bench.bench_search import bench_config, work_cohort
from stence.pipelines.pretrain import run_pretrain
from stence.train.driver import ensure_ray, shutdown_ray
from stence.train.features import extract_features
from stence.train.pretrain_loop import SELECT_METRIC
from stence.tune.spaces import build_param_space, load_space
from stence.tune.sweep import run_sweep

KEEP = ("val/", "train/loss")  # the metrics kept per epoch


def grid_levels(spec: dict[str, Any], n: int) -> list[float]:
    """`n` levels at the centres of `n` equal cells of the range (log scale for log-uniform)."""
    lo, hi = float(spec["low"]), float(spec["high"])
    if spec["type"] == "loguniform":
        a, b = math.log(lo), math.log(hi)
        return [float(f"{math.exp(a + (i + 0.5) * (b - a) / n):.6g}") for i in range(n)]
    if spec["type"] == "uniform":
        return [float(f"{lo + (i + 0.5) * (hi - lo) / n:.6g}") for i in range(n)]
    raise ValueError(f"grid over {spec['type']} parameters is not supported")


def grid_variants(space: Any, levels: int, noise_configs: int, noise_seeds: int, seed: int,
                  point: dict[str, Any]) -> list[dict[str, Any]]:  # fmt: skip
    """The grid (training seed 0), then `noise_configs` configurations again with seeds 1..noise_seeds-1: the
    grid point nearest `point` (the space's first point to evaluate, completed from the config) and others."""
    params = space.data["params"]
    axes = {k: grid_levels(spec, levels) for k, spec in params.items()}
    grid = [dict(zip(axes, values, strict=True)) for values in itertools.product(*axes.values())]
    variants = [{**g, "train.seed": 0} for g in grid]
    def distance(g: dict[str, Any]) -> float:
        d = 0.0
        for k, v in point.items():
            if k in g:
                log = params[k]["type"] == "loguniform"
                d += abs(math.log(g[k] / v)) if log else abs(g[k] - v)
        return d

    first = min(grid, key=distance)
    others = [g for g in grid if g is not first]
    chosen = [first, *random.Random(seed).sample(others, max(0, min(noise_configs, len(grid)) - 1))]
    variants += [{**g, "train.seed": s} for g in chosen for s in range(1, noise_seeds)]
    return variants


class CurveLog(tune.Callback):
    """A Tune callback keeping every result's kept metrics with its trial's config."""

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        row = {k: v for k, v in trial.config.items()}
        row["epoch"] = int(result.get("training_iteration", 0))
        row.update({k: float(v) for k, v in result.items() if k.startswith(KEEP) and isinstance(v, (int, float))})
        self.rows.append(row)


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", default=None, help="demo run folder (read only); default: prepare one in --work")
    p.add_argument("--work", default=None, help="work folder (default: a temporary one, removed afterwards)")
    p.add_argument("--space", default="default")
    p.add_argument("--levels", type=int, default=3)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--noise-configs", type=int, default=4)
    p.add_argument("--noise-seeds", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=1, help="Ray Train workers per trial")
    p.add_argument("--max-concurrent", type=int, default=2)
    p.add_argument("--limit", type=int, default=None, help="record only the first N variants (a smoke run)")
    p.add_argument("--out", default="bench/curves/default.csv.gz")
    args = p.parse_args(argv)
    os.environ.setdefault("STENCE_SALT", "bench-secret")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    space = load_space(args.space)
    tmp = None if args.work else tempfile.TemporaryDirectory(prefix="record-curves-")
    work = Path(args.work or tmp.name).resolve()
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    try:
        uri = f"sqlite:///{work / 'mlflow.db'}"
        runs, cohort = work_cohort(args.runs, work, uri)
        cfg = bench_config(cohort, runs, work, args.epochs, args.workers, uri)
        points = build_param_space(space, cfg)[1]
        variants = grid_variants(space, args.levels, args.noise_configs, args.noise_seeds, args.seed,
                                 points[0] if points else {})[: args.limit]
        ensure_ray()
        extract_features(cfg, progress=False)
        space_file = work / "grid.yaml"
        space_file.write_text(yaml.safe_dump({"kind": "variants", "variants": variants}, sort_keys=False))
        log = CurveLog()
        run_sweep(run_pretrain, cfg, space=space_file, num_samples=len(variants),
                  max_concurrent=args.max_concurrent, scheduler="none", metric=SELECT_METRIC, mode="max",
                  name=f"record-curves-{time.strftime('%H%M%S')}", max_t=args.epochs, callbacks=[log])
    finally:
        shutdown_ray()
        if tmp is not None:
            tmp.cleanup()
    df = pd.DataFrame(log.rows).rename(columns={"train.seed": "seed"})
    df = df.sort_values([*space.data["params"], "seed", "epoch"]).reset_index(drop=True)
    for c in df.columns:  # the metrics to 6 decimals; the parameters stay exact (they are the grid's keys)
        if c.startswith(KEEP):
            df[c] = np.round(df[c], 6)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(out, index=False)
    print(f"{df.groupby([*space.data['params'], 'seed']).ngroups} runs x {args.epochs} epochs in {time.perf_counter() - t0:.0f} s -> {out}")
    return out


if __name__ == "__main__":
    main()
