"""The GPU check's three parts (bench/gpu_check.py): its configuration and synthetic inputs, bf16 pretraining
through `fit` with one worker, feature extraction in a GPU actor, and the training data path's samples/s per
core."""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.gpu_math import count_flops, throughput_figures

REPO = Path(__file__).resolve().parents[1]
PAPER_CONFIG = REPO / "configs" / "paper.yaml"
START_TIMEOUT_S = "90"  # a worker group that cannot get its GPU fails after this (x retries), not 120 s


# ---------------------------------------------------------------------------------------------------
# configuration and synthetic inputs


def check_config(args: argparse.Namespace, storage: str):
    """The resolved Config of the check: configs/paper.yaml (or --config) for the GPU, the defaults with tiny
    models for --cpu-smoke; one Ray Train worker, no tracking, no restarts, no weight files."""
    from stence.config import Config, apply_overrides, load_config

    overrides: dict[str, Any] = {
        "model.ecg": args.encoder,
        "model.ecg_checkpoint": "",
        "model.angio_checkpoint": "",
        "feature.frame_checkpoint": "",
        "optim.batch_size": args.batch,
        "train.workers": 1,
        "train.gpus": 0 if args.cpu_smoke else 1,
        "train.cpus_per_worker": 1,
        "train.max_failures": 0,
        "train.keep_checkpoints": 1,
        "train.storage_path": storage,
        "train.name": "gpu-check",
        "tracking.enabled": False,
        "data.num_workers": 0,
    }
    if args.cpu_smoke:
        overrides.update({"feature.variants": 2})
        base = load_config(args.config) if args.config else Config()
    else:
        base = load_config(args.config or PAPER_CONFIG)
    return apply_overrides(base, overrides)


def frame_patches(cfg) -> int:
    """Patch tokens per view of the configured frame encoder (the P of cached features)."""
    from stence.models.registry import build_frame_encoder

    return int(build_frame_encoder(cfg).n_patches)


def synthetic_batch(cfg, batch: int, views: int, patches: int, device: torch.device | str,
                    seed: int = 0) -> dict[str, torch.Tensor]:
    """A paired batch in the shapes StenceModel.forward and StenceLoss take (what collate_paired yields with
    cached features): ecg (B, 12, T) under the encoder's contract, angio_feats (B, V, P, F), view_mask (B, V)
    all real, angles (B, V, 2) degrees, targets (B, 11) 0/1, index (B,)."""
    from stence.data.contract import resolve_contract
    from stence.data.labels import TARGET_NAMES

    contract = resolve_contract(cfg)
    g = torch.Generator().manual_seed(seed)
    out = {
        "ecg": torch.randn(batch, len(contract.leads), contract.n_samples, generator=g),
        "angio_feats": torch.randn(batch, views, patches, cfg.feature.feature_dim, generator=g),
        "view_mask": torch.ones(batch, views, dtype=torch.bool),
        "angles": (torch.rand(batch, views, 2, generator=g) - 0.5) * 60,
        "targets": torch.randint(0, 2, (batch, len(TARGET_NAMES)), generator=g).float(),
        "index": torch.arange(batch),
    }
    return {k: v.to(device) for k, v in out.items()}


# ---------------------------------------------------------------------------------------------------
# part: pretraining (Ray Train per-worker loop)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def pretrain_check_loop(config: dict[str, Any]) -> None:
    """Per-worker loop: model, loss, optimisers and schedulers as `pretrain_loop` builds them; FLOPs of one
    `pretrain_step`; warm-up; timed `pretrain_step`s on a device-resident synthetic batch; the H2D copy of that
    batch from CPU memory; metrics reported with a checkpoint (Ray Train V2 keeps metrics only with one)."""
    import torch.distributed as dist

    from stence.config import from_dict
    from stence.losses import StenceLoss
    from stence.models.registry import build_stence_model
    from stence.train.common import to_device, unwrap, wrap_model
    from stence.train.pretrain_loop import pretrain_step, tower_optimizers, tower_schedulers
    from stence.train.worker import report, seed_everything, worker_info

    cfg = from_dict(config["config"])
    info = worker_info()
    seed_everything(cfg.train.seed, info.rank)
    if info.device.type == "cpu":
        torch.set_num_threads(max(1, cfg.train.cpus_per_worker))
    backend = dist.get_backend() if dist.is_available() and dist.is_initialized() else "none"
    if backend != "none":  # one collective: the process group the trainer set up works on this device
        probe = torch.ones(1, device=info.device if backend == "nccl" else "cpu")
        dist.all_reduce(probe)
    model = wrap_model(build_stence_model(cfg), info, find_unused=cfg.loss.w_sten == 0)
    core = unwrap(model)
    model.train()
    named = tower_optimizers(core, cfg)
    opts = [o for _, o in named]
    scheds = tower_schedulers(named, cfg, steps_per_epoch=10_000)  # stays in warm-up: the LR is irrelevant here
    loss_fn = StenceLoss(cfg.loss.w_sten, gather=cfg.loss.gather)
    B = cfg.optim.batch_size
    cpu_batch = synthetic_batch(cfg, B, config["views"], config["patches"], "cpu", seed=cfg.train.seed)
    batch = to_device(cpu_batch, info.device)

    def step() -> dict[str, torch.Tensor]:
        return pretrain_step(model, loss_fn, batch, opts, scheds, info, cfg.optim.grad_clip)

    flops_per_step = count_flops(step)  # also the first warm-up step
    for _ in range(config["warmup_steps"]):
        step()
    if info.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(info.device)
    _sync(info.device)
    steps, t0 = 0, time.perf_counter()
    while steps < config["min_steps"] or time.perf_counter() - t0 < config["seconds"]:
        terms = step()
        steps += 1
    _sync(info.device)
    seconds = time.perf_counter() - t0
    loss = float(terms["loss"].detach())
    h2d = []
    for _ in range(3 if info.device.type == "cuda" else 0):  # the loop's to_device of a loader batch (unpinned)
        _sync(info.device)
        t = time.perf_counter()
        to_device(cpu_batch, info.device)
        _sync(info.device)
        h2d.append(time.perf_counter() - t)
    metrics = {
        "samples_per_s": B * steps / seconds,
        "steps": steps,
        "seconds": seconds,
        "batch": B,
        "flops_per_step": float(flops_per_step),
        "flops_per_sample": flops_per_step / B,
        "loss": loss,
        "loss_finite": float(math.isfinite(loss)),
        "params": float(sum(p.numel() for p in core.parameters())),
        "h2d_s_per_batch": min(h2d) if h2d else None,  # None on CPU: to_device copies nothing there
        "h2d_bytes_per_batch": float(sum(v.numel() * v.element_size() for v in cpu_batch.values())),
        "peak_mem_gib": (torch.cuda.max_memory_allocated(info.device) / 2**30) if info.device.type == "cuda" else 0.0,
        "backend": backend,
        "world_size": info.world_size,
        "device": torch.cuda.get_device_name(info.device) if info.device.type == "cuda" else "cpu",
        "precision": "bf16" if info.device.type == "cuda" else "fp32",  # the platform's autocast: off on CPU
    }
    report(metrics, state={"gpu_check": 1}, iteration=1)


def run_pretrain(cfg, *, views: int, patches: int, seconds: float, warmup_steps: int,
                 min_steps: int) -> dict[str, Any]:
    """The pretraining part through the platform's `fit`; the worker's metrics plus the run's wall time."""
    from stence.train.driver import START_TIMEOUT_ENV, fit

    os.environ.setdefault(START_TIMEOUT_ENV, START_TIMEOUT_S)
    t0 = time.perf_counter()
    result = fit(pretrain_check_loop, cfg, stage="gpu-check",
                 loop_config={"views": views, "patches": patches, "seconds": seconds,
                              "warmup_steps": warmup_steps, "min_steps": min_steps},
                 metric="samples_per_s", mode="max", run_name=f"gpu-check-{time.time_ns()}")
    wall = time.perf_counter() - t0
    if result.error:
        raise RuntimeError(f"pretraining run failed: {result.error}")
    m = dict(result.metrics)
    m.pop("training_iteration", None)
    m["fit_wall_s"] = wall
    h2d = m.get("h2d_s_per_batch")
    m["h2d_gb_per_s"] = m["h2d_bytes_per_batch"] / h2d / 1e9 if h2d else None
    m["h2d_samples_per_s_ceiling"] = m["batch"] / h2d if h2d else None
    return m


# ---------------------------------------------------------------------------------------------------
# part: feature extraction on a GPU actor


class FeatureProbe:
    """Ray actor holding the platform's `FrameEncoderActor` (one frame encoder, as Ray Data's actor pool
    holds it) and timing it."""

    def __init__(self, cohort_root: str, cfg_dict: dict[str, Any]):
        from stence.train.features import FrameEncoderActor

        self.actor = FrameEncoderActor(cohort_root, cfg_dict)
        self.device = torch.device(self.actor.device)

    def device_name(self) -> str:
        return torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu"

    def actor_path(self, batch_size: int, seconds: float, warmup: int, min_batches: int) -> dict[str, float]:
        """Frames/s of FrameEncoderActor.__call__ over the (view, variant) pairs extraction enumerates."""
        n_views = int(self.actor.cohort.frame_cache.shape[0])
        n_var = int(self.actor.cfg.feature.variants)
        pairs = np.array([(r, v) for r in range(n_views) for v in range(n_var)], dtype=np.int64)  # (N, 2)

        def batch_at(k: int) -> dict[str, np.ndarray]:
            sel = pairs[(k * batch_size + np.arange(batch_size)) % len(pairs)]
            return {"row": sel[:, 0], "variant": sel[:, 1]}

        for k in range(warmup):
            self.actor(batch_at(k))
        k, frames, t0 = warmup, 0, time.perf_counter()
        while k - warmup < min_batches or time.perf_counter() - t0 < seconds:
            out = self.actor(batch_at(k))  # returns numpy: the device work is finished
            frames += len(out["row"])
            k += 1
        dt = time.perf_counter() - t0
        return {"batch": batch_size, "frames": frames, "seconds": dt, "frames_per_s": frames / dt,
                "augmented_share": float(np.mean(pairs[:, 1] > 0))}

    def encoder_only(self, batch_size: int, seconds: float, warmup: int, min_batches: int) -> dict[str, float]:
        """Frames/s and FLOPs/frame of the frame encoder's forward on a device-resident batch, with the same
        inference_mode and autocast (bf16 on GPU) as FrameEncoderActor.__call__."""
        cfg, enc, dev = self.actor.cfg, self.actor.encoder, self.device
        size = cfg.feature.image_size
        x = self.actor.prepare(torch.rand(batch_size, size, size), size).to(dev)  # (N, 3, S, S)

        def forward() -> torch.Tensor:
            with torch.inference_mode(), torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
                return enc(x)

        flops = count_flops(forward)
        for _ in range(warmup):
            forward()
        _sync(dev)
        n, t0 = 0, time.perf_counter()
        while n < min_batches or time.perf_counter() - t0 < seconds:
            forward()
            n += 1
        _sync(dev)
        dt = time.perf_counter() - t0
        return {"batch": batch_size, "frames": n * batch_size, "seconds": dt,
                "frames_per_s": n * batch_size / dt, "flops_per_frame": flops / batch_size}


def run_features(cfg, cohort_root: str, *, gpu: bool, seconds: float, warmup: int, min_batches: int,
                 peak: float | None) -> dict[str, Any]:
    """The feature part: FrameEncoderActor in a Ray actor with num_gpus=1 (0 for --cpu-smoke)."""
    import ray

    from stence.config import to_dict

    bs = cfg.feature.batch_size
    cls = ray.remote(num_gpus=1 if gpu else 0, num_cpus=1)(FeatureProbe)
    t0 = time.perf_counter()
    actor = cls.remote(cohort_root, to_dict(cfg))
    try:
        device = ray.get(actor.device_name.remote(), timeout=180)
        start = time.perf_counter() - t0
        share = seconds / 3
        path = ray.get(actor.actor_path.remote(bs, share, warmup, min_batches), timeout=180 + share)
        enc = [ray.get(actor.encoder_only.remote(b, share, warmup, min_batches), timeout=180 + share)
               for b in (bs, 4 * bs)]
    finally:
        ray.kill(actor)
    for e in enc:
        e.update(throughput_figures(e["flops_per_frame"], e["frames_per_s"], peak))
    return {"device": device, "actor_start_s": start, "frame_encoder": cfg.feature.frame_encoder,
            "image_size": cfg.feature.image_size, "feature_dim": cfg.feature.feature_dim,
            "actor_path": path, "encoder_only": enc}


# ---------------------------------------------------------------------------------------------------
# part: the data path


class _Cycled(torch.utils.data.Dataset):
    """`base` repeated to `length` items: a small synthetic cohort gives one long epoch, so DataLoader
    worker start-up (paid once per epoch) stays out of the timed window."""

    def __init__(self, base, length: int):
        self.base, self.length = base, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int):
        return self.base[i % len(self.base)]


def make_cohort(cfg, root: Path, *, patients: int, views: int, processes: int) -> Path:
    """A synthetic export ("tiny" preset, `views` views per study) ingested with `cfg` (its frame size)."""
    from stence.data.ingest import ingest
    from stence.data.synth import SynthConfig, write_cohort

    write_cohort(root / "raw", SynthConfig.preset("tiny", patients=patients, views=views, seed=3))
    ingest(root / "raw", root / "cohort", cfg, processes=processes)
    return root / "cohort"


def write_feature_store(cohort_root: Path, root: Path, variants: int, patches: int, dim: int,
                        seed: int = 0) -> Path:
    """A complete FeatureStore at `root` (outside the cohort, which stays untouched) of synthetic float16
    features (n_views, variants, P, F) for the cohort's views."""
    from stence.data.cohort_io import Cohort

    root = Path(root)
    root.mkdir(parents=True, exist_ok=False)
    n_views = len(Cohort.open(cohort_root).views)
    shape = (n_views, variants, patches, dim)
    mm = np.lib.format.open_memmap(root / "feats.npy", mode="w+", dtype=np.float16, shape=shape)
    block = np.random.default_rng(seed).standard_normal((patches, dim), dtype=np.float32).astype(np.float16)
    for i in range(n_views):
        for v in range(variants):
            mm[i, v] = np.roll(block, i * variants + v, axis=0)  # distinct, non-zero pages
    mm.flush()
    del mm
    meta = {"key": root.name, "shape": list(shape), "synthetic": True}
    (root / "meta.json").write_text(json.dumps(meta))
    return root


def run_data_path(cfg, cohort_root: Path, store_root: Path, *, workers: int, batch: int, seconds: float,
                  warmup_batches: int, min_batches: int) -> dict[str, Any]:
    """Samples/s of the training data path in a DataLoader with `workers` processes, and per core."""
    from stence.data.cohort_io import Cohort
    from stence.data.contract import resolve_contract
    from stence.data.datasets import PairedDataset, collate_paired
    from stence.data.feature_store import FeatureStore
    from stence.train.common import train_loader
    from stence.train.worker import WorkerInfo

    contract = resolve_contract(cfg)  # the contract build_ecg_encoder gives the model (no scaler here)
    ds = PairedDataset(Cohort.open(cohort_root), "train", cfg.data, FeatureStore.open(store_root), train=True,
                       seed=cfg.train.seed, contract=contract)
    loader, _ = train_loader(_Cycled(ds, 1_000_000), batch, WorkerInfo(0, 1, 0, torch.device("cpu")),
                             collate_paired, cfg.train.seed, workers)
    it = iter(loader)
    try:
        for _ in range(warmup_batches):
            next(it)
        n, batches, t0 = 0, 0, time.perf_counter()
        while batches < min_batches or time.perf_counter() - t0 < seconds:
            n += len(next(it)["ecg"])
            batches += 1
        dt = time.perf_counter() - t0
    finally:
        del it  # shuts the worker processes down
    sps = n / dt
    cores = max(1, workers)
    feats = ds[0]["angio_feats"]
    return {"loader_workers": workers, "batch": batch, "samples": n, "seconds": dt, "samples_per_s": sps,
            "samples_per_s_per_core": sps / cores, "train_pairs": len(ds),
            "angio_feats_mb_per_sample": feats.numel() * feats.element_size() / 1e6,
            "ecg_samples": int(contract.n_samples)}
