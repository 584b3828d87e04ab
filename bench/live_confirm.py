"""Live confirmation of the replay's prediction: one real `stence tune --budget` sweep set against the replay.

The replay benchmark (bench/bench_replay.py) predicts, from a recorded table of learning curves
(bench/curves/default.csv.gz, bench/record_curves.py), how the TPE + ASHA sweep does at a budget of
trial-epochs. This script runs ONE real sweep through the command line, on the data and config the table was
recorded with (bench/bench_search.py `bench_config`: configs/demo.yaml, --epochs 8, train.knn_every=1,
in-process trials (workers 0), the demo run's stage-A angiography exports):

  python -m stence.cli tune --config <work>/live_confirm.yaml --space default --num-samples B --budget B
         --max-concurrent 2 --seed S --scheduler asha --search tpe --no-register --sweep-name live-confirm

and reads the sweep's own best-so-far curve (<work>/ray/live-confirm/summary/best_so_far.csv) and its trials
(each trial's result.json: how many epochs it ran, whether a STOP decision ended it). It then replays the
TPE + ASHA arm (bench/replay.py `replay`) over --replay-seeds sampler seeds at the same budget, with what the
live sweep does: 2 trials at once, ASHA reduction factor 4 and max_t = the epochs, TPE's start-up trials as
`stence tune` sizes them (`startup_trials(num_samples=B, 2)`), and the space's points_to_evaluate (the
paper's W_Sten/tau, learning rates from the config) tried first. A second replay with bench_replay.py's own
settings (no points_to_evaluate, start-up trials for 8 full trials) is reported beside it: that is the
published prediction. At budgets B/4, B/2 and B (16, 32, 64 by default) the live best-so-far is set against
the replays' median, interquartile range and 5-95 % range; the live sweep's trials and early-stopped trials
against the replay's median; and the verdict is whether the live value lies inside the matched replay's
5-95 % range.

Two checks beside it say where a gap comes from. The table check sets every live trial-epoch against
the table's mean at the trial's snapped configuration and epoch: near zero, the table describes the live
system. The seed-0 replay repeats the matched replay on the table's training-seed-0 curves only: a live
sweep trains every trial with the config's train.seed (0), while the replay draws one of the recorded
seeds for the 4 configurations the table holds 5 seeds of (the objective's seed-to-seed noise is larger
than its spread between configurations, bench/curve_noise.py), which widens the replay's upper tail.

What this can and cannot show. The prediction is distributional: the replay snaps every proposed
configuration to the table's 3-level grid (81 configurations) and answers with a recorded curve (one of up
to 5 training seeds), and it simulates time with every epoch taking one unit and no start-up cost, so
trials finish in a different order than live ones do. The live sweep samples the continuous space and
trains for real, so its values need not be grid values and its path differs from every replay. Snapping
also freezes the noise per grid point: a proposal near a grid point whose recorded curve was lucky gets
that curve again, while a live trial there is a fresh draw, so the replay can be optimistic. One live
sweep is one draw: lying inside the 5-95 % range means it is consistent with the prediction, not that the
prediction is exact; lying outside it flags a gap between the table and the live system (or a rare draw).

Early-stopped (live): a trial that ran fewer than max_t epochs and whose last result carries a STOP
decision (done=True) reported before the budget was spent; the trials still running when the budget ran out
count as cut by the budget, as in the replay. The order of results is the sweep summary's (by timestamp).

Data: --runs DIR takes DIR/cohort (copied into --work; DIR is only read) and the stage-A exports in
DIR/ray/exports/angio-demo-angio; without it a demo run is prepared in --work (bench_search.prepare_demo_run).

Usage: python -m bench.live_confirm [--runs DIR] [--work DIR] [--budget 64] [--seed 0] [--replay-seeds 50]
       [--table bench/curves/default.csv.gz] [--out bench/results/live_confirm.json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from bench.bench_search import ROOT, bench_config, work_cohort
from bench.replay import CurveTable, ReplayRun, replay
from stence.config import save_config
from stence.train.pretrain_loop import SELECT_METRIC
from stence.tune.search import startup_trials
from stence.tune.spaces import build_param_space, load_space

DEFAULT_TABLE = "bench/curves/default.csv.gz"
SWEEP_NAME = "live-confirm"
SPACE = "default"
CONCURRENCY = 2
REDUCTION_FACTOR = 4
EPOCHS = 8  # the table's epochs: ASHA's max_t and a full trial
REFERENCE_FULL_TRIALS = 8  # bench_replay.py sizes TPE's start-up to budget // epochs trials


# ---------------------------------------------------------------------------------------------------
# pure: the comparison


def spread(xs: Sequence[float]) -> dict[str, float]:
    """Median, quartiles and the 5-95 % range (numpy's linear percentiles, as bench_replay's quartiles)."""
    p5, q1, med, q3, p95 = (float(v) for v in np.percentile(np.asarray(xs, dtype=float), [5, 25, 50, 75, 95]))
    return {"median": med, "q1": q1, "q3": q3, "p5": p5, "p95": p95}


def report_budgets(budget: int) -> list[int]:
    """Budget/4, budget/2 and the budget (16, 32, 64 for 64): bench_replay's fixed budgets."""
    return sorted({max(1, budget // 4), max(1, budget // 2), budget})


def compare_to_replay(live_curve: Sequence[float], replay_curves: Sequence[Sequence[float]],
                      budgets: Sequence[int], *, live_trials: int | None = None,
                      live_stopped: int | None = None, replay_trials: Sequence[int] = (),
                      replay_stopped: Sequence[int] = ()) -> dict[str, Any]:  # fmt: skip
    """The live best-so-far curve (one value per trial-epoch) against replayed ones, at each of `budgets`.

    Per budget b: the live value (the curve at b trial-epochs; a curve that ended earlier gives its last
    value, and `live_trial_epochs` < b says so), the replays' spread at b, whether the live value lies
    inside their 5-95 % range (inclusive), and its rank (the share of replays at or below it). With the
    counts given: the live trials and early-stopped trials against the replays' spread of them.
    """
    if not len(live_curve):
        raise ValueError("the live sweep reported no result")
    if not replay_curves:
        raise ValueError("no replay curves to compare with")
    out: dict[str, Any] = {"budgets": {}}
    for b in budgets:
        if any(len(c) < b for c in replay_curves):
            raise ValueError(f"a replay curve is shorter than the budget {b}")
        n = min(b, len(live_curve))
        live = float(live_curve[n - 1])
        at = [float(c[b - 1]) for c in replay_curves]
        s = spread(at)
        out["budgets"][str(b)] = {
            "live": live, "live_trial_epochs": n, "replay": s,
            "inside_5_95": bool(s["p5"] <= live <= s["p95"]),
            "rank": sum(v <= live for v in at) / len(at),
        }  # fmt: skip
    for key, live_n, rep in (("trials", live_trials, replay_trials), ("stopped_early", live_stopped,
                                                                       replay_stopped)):
        if live_n is not None or len(rep):
            out[key] = {"live": live_n, "replay": spread(rep) if len(rep) else None}
    last = out["budgets"][str(max(budgets))]
    out["inside_5_95_at_budget"] = last["inside_5_95"]
    return out


def table_agreement(rows: Sequence[tuple[Mapping[str, Any], int, float]], table: CurveTable) -> dict[str, Any]:
    """Live values against the table: each (trial config, epoch, value) minus the table's mean over its
    training seeds at the config's snapped grid point and that epoch. n, mean, median and mean |difference|."""
    diffs = []
    for config, epoch, value in rows:
        runs = table.curves[table.snap(config)]
        if 1 <= epoch <= table.epochs and value is not None and math.isfinite(value):
            diffs.append(float(value) - float(np.mean([c[epoch - 1] for c in runs])))
    if not diffs:
        return {"n": 0, "mean": None, "median": None, "mean_abs": None}
    d = np.asarray(diffs)
    return {"n": len(d), "mean": float(d.mean()), "median": float(np.median(d)), "mean_abs": float(np.abs(d).mean())}


def live_trial_counts(trial_ids: Sequence[str], trials: Mapping[str, tuple[int, bool]], budget: int,
                      max_t: int) -> dict[str, Any]:  # fmt: skip
    """Trials and early-stopped trials of a live sweep within `budget` trial-epochs.

    `trial_ids`: the trial of each reported result, in order (the summary's best_so_far.csv); `trials`:
    trial id -> (epochs it ran, whether its last result carries done=True, i.e. a STOP decision). Trials are
    those that reported within the budget. Early-stopped: fewer than `max_t` epochs and a STOP decision on a
    result reported before the budget was spent (the budget's own stops and the trials still running when
    it ran out are `cut_by_budget`).
    """
    within = list(trial_ids)[:budget]
    last_pos = {t: i + 1 for i, t in enumerate(trial_ids)}  # 1-based position of each trial's last result
    seen = list(dict.fromkeys(within))
    stopped, cut = [], []
    for t in seen:
        epochs, done = trials.get(t, (sum(x == t for x in trial_ids), False))
        if epochs >= max_t:
            continue
        (stopped if done and last_pos[t] < budget else cut).append(t)
    return {"trials": len(seen), "stopped_early": len(stopped), "cut_by_budget": len(cut),
            "epochs_per_trial": {t: trials.get(t, (sum(x == t for x in within), False))[0] for t in seen}}


# ---------------------------------------------------------------------------------------------------
# the live sweep


def read_trials(sweep: Path) -> dict[str, tuple[int, bool]]:
    """Trial id -> (epochs reported, last result done) from each trial folder's result.json."""
    out: dict[str, tuple[int, bool]] = {}
    for f in sorted(sweep.glob("*/result.json")):
        rows = [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
        if rows:
            tid = str(rows[-1].get("trial_id", ""))
            out[tid] = (max(int(r.get("training_iteration", 0)) for r in rows), bool(rows[-1].get("done")))
    return out


def read_rows(sweep: Path, metric: str) -> list[tuple[dict[str, Any], int, float]]:
    """(trial config, epoch, metric value) of every result in the trial folders' result.json."""
    out = []
    for f in sorted(sweep.glob("*/result.json")):
        for line in f.read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                value = r.get(metric)
                out.append((r.get("config", {}), int(r.get("training_iteration", 0)),
                            float(value) if isinstance(value, (int, float)) else math.nan))
    return out


def tune_command(config: Path, budget: int, seed: int) -> list[str]:
    return [sys.executable, "-m", "stence.cli", "tune", "--config", str(config), "--space", SPACE,
            "--num-samples", str(budget), "--budget", str(budget), "--max-concurrent", str(CONCURRENCY),
            "--seed", str(seed), "--scheduler", "asha", "--search", "tpe", "--no-register",
            "--sweep-name", SWEEP_NAME]  # fmt: skip


def run_live(cmd: list[str], log: Path, env: Mapping[str, str], timeout: float | None) -> float:
    """The sweep as a subprocess from the repository root, its output in `log`; its wall time."""
    print(f"$ {shlex.join(cmd)}\n  (log: {log})", flush=True)
    t0 = time.perf_counter()
    with log.open("w") as f:
        rc = subprocess.run(cmd, cwd=ROOT, env=dict(env), stdout=f, stderr=subprocess.STDOUT,
                            timeout=timeout).returncode  # fmt: skip
    wall = time.perf_counter() - t0
    if rc != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-40:])
        raise RuntimeError(f"stence tune exited with {rc} after {wall:.0f} s; the end of {log}:\n{tail}")
    return wall


# ---------------------------------------------------------------------------------------------------
# output


def _f(x: float | None) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}"


def markdown(res: dict[str, Any]) -> str:
    """The comparison as a small markdown table (matched replay, then bench_replay's settings)."""
    m, r = res["comparison"], res["comparison_reference"]
    z = res.get("comparison_seed0", r)
    lines = ["| trial-epochs | live best so far | replay median [IQR] | replay 5-95 % | inside | "
             "bench_replay median [IQR] | seed-0 replay median [5-95 %] |",
             "|---:|---:|---|---|:---:|---|---|"]  # fmt: skip
    for b, c in m["budgets"].items():
        s, t, u = c["replay"], r["budgets"][b]["replay"], z["budgets"][b]["replay"]
        live = _f(c["live"]) + ("" if c["live_trial_epochs"] == int(b) else f" (at {c['live_trial_epochs']})")
        lines.append(f"| {b} | {live} | {_f(s['median'])} [{_f(s['q1'])}, {_f(s['q3'])}] | "
                     f"{_f(s['p5'])}-{_f(s['p95'])} | {'yes' if c['inside_5_95'] else 'NO'} | "
                     f"{_f(t['median'])} [{_f(t['q1'])}, {_f(t['q3'])}] | "
                     f"{_f(u['median'])} [{_f(u['p5'])}-{_f(u['p95'])}] |")  # fmt: skip
    for key, label in (("trials", "trials"), ("stopped_early", "early-stopped trials")):
        s, t, u = m[key]["replay"], r[key]["replay"], z[key]["replay"]
        lines.append(f"| {label} | {m[key]['live']} | {s['median']:.0f} [{s['q1']:.0f}, {s['q3']:.0f}] | "
                     f"{s['p5']:.0f}-{s['p95']:.0f} | | {t['median']:.0f} [{t['q1']:.0f}, {t['q3']:.0f}] | "
                     f"{u['median']:.0f} [{u['p5']:.0f}-{u['p95']:.0f}] |")  # fmt: skip
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------


def replay_arm(table: CurveTable, space: Any, seeds: int, budget: int, n_startup: int,
               points: list[dict[str, Any]]) -> tuple[list[ReplayRun], float]:  # fmt: skip
    t0 = time.perf_counter()
    runs = [replay(table, space, "tpe_asha", s, budget, concurrency=CONCURRENCY, n_startup=n_startup,
                   reduction_factor=REDUCTION_FACTOR, points=points) for s in range(seeds)]  # fmt: skip
    return runs, time.perf_counter() - t0


def _compare(live_curve: list[float], runs: list[ReplayRun], budgets: list[int], counts: dict[str, Any]) -> dict:
    return compare_to_replay(live_curve, [r.curve for r in runs], budgets, live_trials=counts["trials"],
                             live_stopped=counts["stopped_early"], replay_trials=[r.trials for r in runs],
                             replay_stopped=[r.stopped_early for r in runs])  # fmt: skip


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", default=None, help="demo run folder (read only); default: prepare one in --work")
    p.add_argument("--work", default=None, help="work folder (default: a temporary one, removed afterwards)")
    p.add_argument("--budget", type=int, default=64, help="trial-epochs of the live sweep and the replays")
    p.add_argument("--seed", type=int, default=0, help="sampler seed of the live sweep")
    p.add_argument("--replay-seeds", type=int, default=50, help="replays (sampler seeds 0..N-1)")
    p.add_argument("--table", default=DEFAULT_TABLE, help="the recorded curve table")
    p.add_argument("--timeout", type=float, default=None, help="seconds the live sweep may take (default: none)")
    p.add_argument("--out", default="bench/results/live_confirm.json")
    args = p.parse_args(argv)
    if args.budget < 1 or args.replay_seeds < 1:
        p.error("--budget and --replay-seeds must be at least 1")
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # a line per replayed study otherwise
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
    env.setdefault("STENCE_SALT", "bench-secret")
    os.environ.setdefault("STENCE_SALT", env["STENCE_SALT"])  # prepare_demo_run's subprocesses
    t_start, load_start = time.perf_counter(), os.getloadavg()
    tmp = None if args.work else tempfile.TemporaryDirectory(prefix="live-confirm-")
    work = Path(args.work or tmp.name).resolve()
    work.mkdir(parents=True, exist_ok=True)
    try:
        res = _run(args, work, env)
    finally:
        if tmp is not None:
            tmp.cleanup()
    res["timing"]["total_s"] = round(time.perf_counter() - t_start, 1)
    res["machine"]["loadavg_start_end"] = [round(load_start[0], 2), round(os.getloadavg()[0], 2)]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1, default=str))
    print(f"\nwrote {out} (total {res['timing']['total_s']:.0f} s)")
    return res


def _run(args: argparse.Namespace, work: Path, env: dict[str, str]) -> dict[str, Any]:
    t0 = time.perf_counter()
    uri = f"sqlite:///{work / 'mlflow.db'}"
    runs, cohort = work_cohort(args.runs, work, uri)
    cfg = bench_config(cohort, runs, work, EPOCHS, 0, uri)  # as the table was recorded (record_curves.py)
    config = work / "live_confirm.yaml"
    save_config(cfg, config)
    sweep = Path(cfg.train.storage_path) / SWEEP_NAME  # tune/sweep.py _new_sweep: <storage_path>/<name>
    if sweep.exists():  # an earlier confirmation in this work folder: kept aside, never mixed in
        sweep.rename(sweep.with_name(f"{SWEEP_NAME}.old-{time.strftime('%Y%m%d-%H%M%S')}"))
    prep = time.perf_counter() - t0

    cmd = tune_command(config, args.budget, args.seed)
    sweep_wall = run_live(cmd, work / "live_confirm.log", env, args.timeout)
    curve_df = pd.read_csv(sweep / "summary" / "best_so_far.csv", dtype={"trial_id": str})
    ids = curve_df["trial_id"].tolist()
    counts = live_trial_counts(ids, read_trials(sweep), args.budget, EPOCHS)
    live_curve = curve_df["best"].astype(float).tolist()[: args.budget]

    space = load_space(SPACE)
    frame = pd.read_csv(args.table)
    table = CurveTable.from_frame(frame, space, SELECT_METRIC)
    table0 = CurveTable.from_frame(frame[frame["seed"] == 0], space, SELECT_METRIC)  # what train.seed 0 draws
    if table.epochs != EPOCHS:
        raise ValueError(f"{args.table} holds {table.epochs}-epoch curves, the live sweep runs {EPOCHS}")
    points = build_param_space(space, cfg)[1]  # what the live sweep evaluates first
    n_startup = startup_trials(args.budget, CONCURRENCY)  # the live sweep's: num_samples = budget
    n_startup_ref = startup_trials(REFERENCE_FULL_TRIALS, CONCURRENCY)
    budgets = report_budgets(args.budget)
    matched, wall_m = replay_arm(table, space, args.replay_seeds, args.budget, n_startup, points)
    reference, wall_r = replay_arm(table, space, args.replay_seeds, args.budget, n_startup_ref, [])
    seed0, wall_0 = replay_arm(table0, space, args.replay_seeds, args.budget, n_startup, points)
    agreement = table_agreement(read_rows(sweep, SELECT_METRIC), table)
    res: dict[str, Any] = {
        "benchmark": "live_confirm",
        "command": shlex.join([sys.executable, "-m", "bench.live_confirm", *(sys.argv[1:])]),
        "tune_command": shlex.join(cmd),
        "settings": {"budget": args.budget, "seed": args.seed, "space": SPACE, "epochs": EPOCHS,
                     "concurrency": CONCURRENCY, "reduction_factor": REDUCTION_FACTOR, "metric": SELECT_METRIC,
                     "table": args.table, "replay_seeds": args.replay_seeds, "runs": args.runs or "prepared",
                     "work": str(work), "config": str(config)},
        "replay_matched": {"n_startup": n_startup, "points_to_evaluate": points},
        "replay_reference": {"n_startup": n_startup_ref, "points_to_evaluate": [],
                             "note": "bench_replay.py's settings: the published prediction"},
        "replay_seed0": {"n_startup": n_startup, "points_to_evaluate": points,
                         "note": "the matched replay on the table's training-seed-0 curves only"},
        "live": {"sweep": str(sweep), "log": str(work / "live_confirm.log"), "curve": live_curve,
                 "results_reported": len(ids), **counts},
        "comparison": _compare(live_curve, matched, budgets, counts),
        "comparison_reference": _compare(live_curve, reference, budgets, counts),
        "comparison_seed0": _compare(live_curve, seed0, budgets, counts),
        "table_check": {**agreement, "note": "live value - table mean over seeds at the snapped config, per "
                        "trial-epoch (all results of the sweep)"},
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "python": platform.python_version()},
        "timing": {"prep_s": round(prep, 1), "sweep_s": round(sweep_wall, 1),
                   "replay_s": round(wall_m + wall_r + wall_0, 1)},
    }  # fmt: skip
    print(f"\nlive sweep: {len(ids)} results, {counts['trials']} trials within {args.budget} trial-epochs, "
          f"{counts['stopped_early']} stopped early, {counts['cut_by_budget']} cut by the budget; "
          f"{sweep_wall:.0f} s")
    print(f"replays: {args.replay_seeds} seeds of TPE + ASHA on {args.table}; matched to the live sweep "
          f"(n_startup {n_startup}, the space's point first), bench_replay's (n_startup {n_startup_ref}, "
          f"no point), and matched on the training-seed-0 curves only\n")
    print(markdown(res))
    if agreement["n"]:
        print(f"\ntable check: live minus table at the snapped configurations over {agreement['n']} "
              f"trial-epochs: mean {agreement['mean']:+.3f}, median {agreement['median']:+.3f}, "
              f"mean |diff| {agreement['mean_abs']:.3f}")
    verdict = res["comparison"]["inside_5_95_at_budget"]
    print(f"\nlive best after {args.budget} trial-epochs "
          f"{'lies inside' if verdict else 'lies OUTSIDE'} the matched replay's 5-95 % range")
    return res


if __name__ == "__main__":
    main()
