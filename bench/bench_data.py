"""Data-path benchmark: training-time ECG samples per second per core, against the paper's way.

  cached    the platform: ECGs decoded, resampled and baseline-corrected once at ingest; each access reads
            a crop from the memory-mapped cache, normalises and augments it (EcgDataset, train=True)
  paper     the public code: every access re-reads the WFDB record and re-runs the ALS baseline fit, then
            crops, normalises and augments
Both run in one process on one core (torch/BLAS threads pinned to 1), on the same synthetic cohort, in the
same run. Also measured: ingest throughput (records per second, decode processes = cores).

Usage: python -m bench.bench_data [--patients 60] [--out bench/results/data.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from stence.config import Config
from stence.data.augment import augment_ecg
from stence.data.cohort_io import Cohort
from stence.data.datasets import EcgDataset
from stence.data.ingest import ingest, read_site_map, site_dir_for
from stence.data.preprocess import crop, deterministic_ecg, normalise_crop, random_start
from stence.data.synth import SynthConfig, write_cohort
from stence.data.wfdb_io import read_ecg


def _pin_one_core() -> None:
    torch.set_num_threads(1)
    try:
        # optional: threadpoolctl comes with scikit-learn; without it BLAS keeps its own thread count
        from threadpoolctl import threadpool_limits

        threadpool_limits(1)
    except ImportError:
        pass


def bench_cached(cohort, cfg, seconds: float) -> float:
    ds = EcgDataset(cohort, "train", cfg.data, "lt70_ge70", train=True, seed=0)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        ds[n % len(ds)]
        n += 1
    return n / (time.perf_counter() - t0)


def bench_paper(raw: Path, cohort, cfg, seconds: float) -> float:
    """WFDB read + resample + ALS baseline on every access, then the same crop/normalise/augment."""
    paths = read_site_map(site_dir_for(cfg, cohort.root)).set_index("file")["path"]  # the cohort names no file
    sources = [raw / paths[f] for f in cohort.ecgs["file"]]
    d = cfg.data
    n_win = int(d.window_s * d.fs)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        rng = np.random.default_rng(n)
        rec = read_ecg(sources[n % len(sources)], d.leads)
        sig, fs = deterministic_ecg(rec.signal, rec.fs, d.fs, d.als_lambda, d.als_p, d.als_iter)
        x = normalise_crop(crop(sig, n_win, random_start(sig.shape[1], n_win, rng)), d.clip_sigma)
        augment_ecg(x, fs, rng)
        n += 1
    return n / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--patients", type=int, default=60)
    p.add_argument("--seconds", type=float, default=10.0, help="measuring time per variant")
    p.add_argument("--out", default="bench/results/data.json")
    args = p.parse_args(argv)
    os.environ.setdefault("STENCE_SALT", "bench-secret")
    cfg = Config()
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "raw"
        write_cohort(raw, SynthConfig.preset("tiny", patients=args.patients, ecgs_per_patient=2, fs=(500, 1000)))
        cores = os.cpu_count() or 1
        t0 = time.perf_counter()
        report = ingest(raw, Path(tmp) / "cohort", cfg, processes=cores)
        ingest_s = time.perf_counter() - t0
        n_files = report.n_ecgs + report.n_views
        _pin_one_core()
        cohort = Cohort.open(Path(tmp) / "cohort")
        cached = bench_cached(cohort, cfg, args.seconds)
        paper = bench_paper(raw, cohort, cfg, args.seconds)
    result = {
        "benchmark": "data_path",
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": cores},
        "cached_samples_per_s_per_core": round(cached, 1),
        "paper_samples_per_s_per_core": round(paper, 1),
        "ratio_cached_vs_paper": round(cached / paper, 1),
        "target_ratio": 30,
        "ingest_files": n_files,
        "ingest_records_per_s": round(report.n_ecgs / ingest_s, 2),
        "ingest_files_per_s": round(n_files / ingest_s, 2),
        "ingest_processes": cores,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"ECG data path, one core: cached {cached:.0f} samples/s vs paper's way {paper:.1f} samples/s "
          f"-> {cached / paper:.1f}x (target >= 30x)")
    print(f"ingest: {report.n_ecgs} ECGs + {report.n_views} views in {ingest_s:.1f} s on {cores} processes "
          f"({report.n_ecgs / ingest_s:.1f} ECG records/s, {n_files / ingest_s:.1f} files/s)")
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
