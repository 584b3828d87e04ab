"""Pretraining throughput: Ray Train (1 and 2 DDP workers) against a plain single-process PyTorch loop,
same model (StenCE, demo-size encoders), same data (synthetic cohort, cached features), same run.

Every variant runs the pretraining loop's own step (`stence.train.pretrain_loop.pretrain_step`: forward,
CLIP + stenosis loss, backward, two AdamW steps and their schedulers) with one torch thread per process, and
times steady-state steps after a warm-up; samples/s of a DDP run is the global batch throughput. Worker-group
start-up is reported separately (it is paid once per run).
The hardware ceiling of two workers on this machine is measured too: two independent plain loops, each
with half the global batch, run at the same time with no communication (two processes share caches,
memory bandwidth and turbo headroom, so even that is below 2x).

Usage: python -m bench.bench_train [--steps 30] [--batch 16] [--out bench/results/train.json]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from ray.train import RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from stence.config import Config, apply_overrides, from_dict, to_dict, update
from stence.data.cohort_io import Cohort
from stence.data.datasets import PairedDataset, collate_paired
from stence.data.feature_store import FeatureStore
from stence.data.ingest import ingest
from stence.data.synth import SynthConfig, write_cohort
from stence.losses import StenceLoss
from stence.models.registry import build_stence_model
from stence.train.common import to_device, train_loader, unwrap, wrap_model
from stence.train.driver import ensure_ray
from stence.train.features import extract_features
from stence.train.pretrain_loop import pretrain_step, tower_optimizers, tower_schedulers
from stence.train.worker import WorkerInfo, all_reduce_sum, report, worker_info

WARMUP = 3


def timed_steps(cfg_dict: dict[str, Any], features_dir: str, steps: int, distributed: bool) -> dict[str, float]:
    """Build model/data/optimisers from the config as `pretrain_loop` does and time `steps` of its training
    step after a warm-up."""
    torch.set_num_threads(1)
    cfg = from_dict(cfg_dict)
    info = worker_info() if distributed else WorkerInfo(0, 1, 0, torch.device("cpu"))
    ds = PairedDataset(Cohort.open(cfg.data.cohort), "train", cfg.data, FeatureStore.open(features_dir), train=True)
    loader, sampler = train_loader(ds, cfg.optim.batch_size, info, collate_paired, 0)
    model = wrap_model(build_stence_model(cfg), info) if distributed else build_stence_model(cfg)
    named = tower_optimizers(unwrap(model), cfg)
    opts, scheds = [o for _, o in named], tower_schedulers(named, cfg, max(1, len(loader)))
    loss_fn = StenceLoss(cfg.loss.w_sten, gather=cfg.loss.gather)
    done, n, t0, epoch = 0, 0, 0.0, 0
    while done < steps + WARMUP:
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        for batch in loader:
            if done == WARMUP:
                t0, n = time.perf_counter(), 0
            batch = to_device(batch, info.device)
            pretrain_step(model, loss_fn, batch, opts, scheds, info, cfg.optim.grad_clip)
            n += batch["ecg"].shape[0]
            done += 1
            if done >= steps + WARMUP:
                break
        epoch += 1
    return {"samples": float(n), "seconds": time.perf_counter() - t0}


def _independent(args: tuple[dict[str, Any], str, int]) -> dict[str, float]:
    return timed_steps(*args, distributed=False)


def run_independent(cfg, features_dir: str, steps: int, workers: int) -> float:
    """Samples/s of `workers` plain loops running at once (each 1/workers of the global batch)."""
    part = update(cfg, optim=update(cfg.optim, batch_size=cfg.optim.batch_size // workers))
    with mp.get_context("spawn").Pool(workers) as pool:
        runs = pool.map(_independent, [(to_dict(part), features_dir, steps)] * workers)
    return sum(r["samples"] / r["seconds"] for r in runs)


def ray_loop(config: dict[str, Any]) -> None:
    r = timed_steps(config["config"], config["features_dir"], config["steps"], distributed=True)
    total = all_reduce_sum({"samples": r["samples"], "seconds": r["seconds"]})
    # global samples over the mean per-worker step time; metrics persist only with a checkpoint (V2)
    report({"samples": total["samples"], "seconds": total["seconds"] / max(1, int(config["workers"]))},
           state={"bench": 1})


def run_ray(cfg, features_dir: str, steps: int, workers: int, storage: str) -> tuple[float, float]:
    t0 = time.perf_counter()
    trainer = TorchTrainer(
        ray_loop,
        train_loop_config={"config": to_dict(cfg), "features_dir": features_dir, "steps": steps,
                           "workers": workers},
        scaling_config=ScalingConfig(num_workers=workers, resources_per_worker={"CPU": 1}),
        run_config=RunConfig(name=f"bench-{workers}w-{time.time_ns()}", storage_path=storage),
    )
    result = trainer.fit()
    wall = time.perf_counter() - t0
    if result.error:
        raise RuntimeError(f"benchmark run failed: {result.error}")
    m = result.metrics
    return m["samples"] / m["seconds"], wall


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch", type=int, default=16, help="global batch (split over the workers)")
    p.add_argument("--out", default="bench/results/train.json")
    args = p.parse_args(argv)
    os.environ.setdefault("STENCE_SALT", "bench-secret")
    with tempfile.TemporaryDirectory() as tmp:
        write_cohort(Path(tmp) / "raw", SynthConfig.preset("tiny", patients=40))
        ingest(Path(tmp) / "raw", Path(tmp) / "cohort", Config(), processes=2)
        cfg = apply_overrides(Config(), {"data.cohort": str(Path(tmp) / "cohort"), "optim.batch_size": args.batch,
                                         "feature.variants": 1})
        ensure_ray(num_cpus=4)
        feats = str(extract_features(cfg, progress=False).root)
        plain = timed_steps(to_dict(cfg), feats, args.steps, distributed=False)
        plain_sps = plain["samples"] / plain["seconds"]
        one, wall1 = run_ray(cfg, feats, args.steps, 1, str(Path(tmp) / "ray"))
        two, wall2 = run_ray(cfg, feats, args.steps, 2, str(Path(tmp) / "ray"))
        ceiling = run_independent(cfg, feats, args.steps, 2)
    result = {
        "benchmark": "pretrain_throughput", "model": {"ecg": cfg.model.ecg, "frame_features": cfg.feature.feature_dim},
        "global_batch": args.batch, "timed_steps": args.steps, "cores": os.cpu_count(),
        "plain_samples_per_s": round(plain_sps, 2),
        "ray_1_worker_samples_per_s": round(one, 2), "ray_2_workers_samples_per_s": round(two, 2),
        "ray_1_worker_overhead_pct": round(100 * (1 - one / plain_sps), 1),
        "speedup_2_vs_1_workers": round(two / one, 2),
        "independent_2_processes_samples_per_s": round(ceiling, 2),
        "hardware_ceiling_2_vs_1": round(ceiling / plain_sps, 2),
        "ddp_efficiency_vs_ceiling_pct": round(100 * two / ceiling, 1),
        "ray_run_wall_s": {"1_worker": round(wall1, 1), "2_workers": round(wall2, 1)},
        "targets": {"overhead_pct_max": 5, "speedup_min": 1.7},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"plain loop {plain_sps:.1f} samples/s | Ray Train 1 worker {one:.1f} "
          f"(overhead {result['ray_1_worker_overhead_pct']:+.1f} %, target <= 5 %) | 2 workers {two:.1f} "
          f"({two / one:.2f}x of 1 worker, target >= 1.7x) | 2 independent plain loops {ceiling:.1f} "
          f"({ceiling / plain_sps:.2f}x: this machine's ceiling; DDP reaches {100 * two / ceiling:.0f} % of it)")
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
