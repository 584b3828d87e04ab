"""GPU check: bf16 OTIS-base StenCE pretraining through Ray Train (one worker, NCCL), frame-feature extraction on a
GPU actor, and the CPU data path that has to feed them; samples/s, achieved TFLOP/s and MFU against the GPU's
bf16 dense peak. Sized to finish inside 8 minutes on one GPU (bench/gpu_check.sh runs it under `timeout 480`).

Parts (each figure measured in this run; a part that fails is reported and the others still run):
  data       the training data path (stence.data.datasets.PairedDataset over a cohort cache and a feature
             store, collate_paired, the loop's own `train_loader`) in a DataLoader with N worker processes:
             samples/s divided by N = samples/s per CPU core. Runs first, before Ray starts (no forking of a
             process that already runs Ray's threads). The cohort is synthetic (`stence synth` "tiny" preset,
             ingested with this config) unless --cohort names one; the feature store (in a temporary folder)
             holds synthetic float16 patch features of the configured shape (written directly: encoding them
             is not what this part measures). The small cohort is cycled through one long epoch, so its
             files sit in the page cache: the figure is the CPU cost of the path, not the disk's.
  pretrain   the platform's driver (`stence.train.driver.fit`, the same TorchTrainer wiring as `stence
             pretrain`) with train.workers=1 and train.gpus=1: Ray chooses the NCCL backend from use_gpu
             (the driver passes no TorchConfig; see the note below), checked in the loop with
             torch.distributed.get_backend() and one all_reduce. The loop builds model, loss, optimisers and
             schedulers as `pretrain_loop` does and times `pretrain_step` (bf16 autocast on GPU: the
             platform's `autocast`) on a synthetic paired batch already on the device: ecg (B, 12, T) under
             the encoder's input contract, angio_feats (B, V, P, F) as cached frame features (what the model
             consumes; the frame encoder is not in the training step), view_mask, angles, targets. Also
             timed: the host-to-device copy of that batch from ordinary (unpinned) CPU memory, as the loop's
             `to_device` does it, which the synthetic on-device batch leaves out of samples/s.
  features   the platform's `FrameEncoderActor` (stence/train/features.py, unmodified) inside a Ray actor with
             num_gpus=1, over the key frames of the same synthetic cohort and the (view, variant) pairs
             extraction enumerates (augmentation of variants > 0 included): frames/s of its __call__ at
             feature.batch_size (host-side stacking, augmentation, copies and the D2H of features included);
             and the frame encoder's bf16 forward alone on a device-resident batch at 1x and 4x that batch
             size, with its TFLOP/s and MFU. The Ray Data pipeline around the actor (map_batches,
             ActorPoolStrategy) is not part of the timing.

FLOPs: torch.utils.flop_counter.FlopCounterMode over one real step (`pretrain_step`; one forward for the frame
encoder), with scaled_dot_product_attention forced to its math backend while counting, so attention is counted
as its matmuls on every device (the CPU flash kernel is invisible to the counter, and the CUDA flash
backward's recomputation would add work that is not model FLOPs). Counted: matmuls, convolutions, attention;
not counted: element-wise work (norms, activations, softmax, the optimiser). Achieved TFLOP/s = FLOPs/sample x
samples/s / 1e12; MFU = achieved / the GPU's bf16 dense peak (PEAKS, by device name; --peak-tflops overrides).

Feeding: cores needed = pretraining samples/s / data-path samples/s per core.

Note on the driver: `stence.train.driver.build_trainer` builds TorchTrainer without a `torch_config`
(driver.py:197-202), so the backend cannot be named there; Ray's TorchTrainer then picks "nccl" when use_gpu
is set (ray/train/v2/torch/torch_trainer.py:192-200) and use_gpu is train.gpus > 0 (driver.py:176-177). The
check relies on that and reads the backend back in the worker. With one worker `wrap_model` does not DDP-wrap
(common.py:75) and the `all_reduce_*` helpers are no-ops (worker.py:61 `_distributed`), so the loop runs one
explicit all_reduce to prove that the NCCL process group works.

--cpu-smoke: the same code path on CPU (gloo, the platform's autocast is off on CPU so float32, OTIS-tiny,
64-px frame features, a few steps, no peak: MFU "n/a"), for tests on machines without a GPU: about a minute on an
idle 2-core machine, nearly all of it the start of Ray and of the Train worker group.
Without a visible GPU and without --cpu-smoke the check refuses (exit code 2, one line).

Usage: python -m bench.gpu_check [--minutes 6] [--encoder otis_base] [--batch 128] [--views 4]
                                 [--parts data,pretrain,features] [--cohort DIR] [--config YAML]
                                 [--loader-workers N] [--peak-tflops X] [--cpu-smoke]
                                 [--out bench/results/gpu_check.json]
Exit code: 0 every part ran, 1 a part failed (the others are still reported), 2 no GPU visible.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

REPO = Path(__file__).resolve().parents[1]
PAPER_CONFIG = REPO / "configs" / "paper.yaml"
PARTS = ("data", "pretrain", "features")

# bf16 dense (no sparsity) tensor-core peaks from the vendor datasheets, TFLOP/s. First match wins: the
# specific names come before the general ones ("H100 PCIe" before "H100", "A100" can never match r"\bA10\b").
PEAKS: tuple[tuple[str, float, str], ...] = (
    (r"H100.*PCIE", 756.0, "H100 PCIe"),
    (r"H100.*NVL", 835.0, "H100 NVL"),
    (r"H200.*NVL", 835.0, "H200 NVL"),
    (r"GH200", 989.0, "GH200"),
    (r"H200", 989.0, "H200 SXM"),
    (r"H100", 989.0, "H100 SXM"),
    (r"A100", 312.0, "A100"),
    (r"\bL4\b", 121.0, "L4"),
    (r"\bA10\b", 125.0, "A10"),
)

# share of --minutes given to each part's timed window (the rest is start-up: ingest, Ray, worker group, models)
WINDOW_SHARE = {"data": 0.10, "pretrain": 0.25, "features": 0.10}
START_TIMEOUT_S = "90"  # a worker group that cannot get its GPU fails after this (x retries), not 120 s


# ---------------------------------------------------------------------------------------------------
# arithmetic: peak table, FLOP counting, throughput figures


def peak_bf16_tflops(device_name: str) -> tuple[float | None, str]:
    """(bf16 dense peak in TFLOP/s, matched label) for a torch.cuda.get_device_name(); (None, "unknown")."""
    for pattern, peak, label in PEAKS:
        if re.search(pattern, device_name, flags=re.IGNORECASE):
            return peak, label
    return None, "unknown"


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of one call of `fn` as FlopCounterMode counts them, attention through its math backend (model
    FLOPs: matmuls, convolutions, attention; element-wise work is not counted)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        fn()
    return int(counter.get_total_flops())


def throughput_figures(flops_per_sample: float, samples_per_s: float, peak_tflops: float | None) -> dict[str, Any]:
    """Achieved TFLOP/s (flops/sample x samples/s / 1e12) and MFU (achieved / peak; None without a peak)."""
    achieved = flops_per_sample * samples_per_s / 1e12
    mfu = achieved / peak_tflops if peak_tflops else None
    return {"achieved_tflops": achieved, "mfu": mfu}


def cores_needed(gpu_samples_per_s: float | None, per_core: float | None) -> float | None:
    """CPU cores of the data path it takes to feed the GPU's training rate."""
    if not gpu_samples_per_s or not per_core:
        return None
    return gpu_samples_per_s / per_core


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


# ---------------------------------------------------------------------------------------------------
# device, report


def device_info(gpu: bool) -> dict[str, Any]:
    info: dict[str, Any] = {
        "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
        "host": platform.node(), "cpu_cores": os.cpu_count(),
    }
    try:
        import ray

        info["ray"] = ray.__version__
    except ImportError:
        info["ray"] = None
    if gpu:
        props = torch.cuda.get_device_properties(0)
        info.update({
            "name": torch.cuda.get_device_name(0),
            "capability": "sm_{}{}".format(*torch.cuda.get_device_capability(0)),
            "memory_gib": round(props.total_memory / 2**30, 1),
            "multiprocessors": props.multi_processor_count,
            "gpus_visible": torch.cuda.device_count(),
            "cudnn": torch.backends.cudnn.version(),
            "nccl": ".".join(map(str, torch.cuda.nccl.version())) if hasattr(torch.cuda, "nccl") else None,
        })
    else:
        info.update({"name": "cpu", "capability": None})
    return info


def refusal(args: argparse.Namespace) -> str | None:
    """The one-line refusal when no GPU is visible and --cpu-smoke is not given; None otherwise."""
    if args.cpu_smoke or torch.cuda.is_available():
        return None
    build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
    return (f"gpu_check: no CUDA GPU visible (torch {torch.__version__}, {build}, "
            f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')}); "
            "run it on a GPU machine with the CUDA torch wheel, or pass --cpu-smoke")


def _fmt(v: float | None, spec: str = ".1f", suffix: str = "") -> str:
    return "n/a" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:{spec}}{suffix}"


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * v:.1f} %"


def format_table(r: dict[str, Any]) -> str:
    """The compact table printed at the end."""
    d = r["device"]
    peak = r["peak"]
    lines = [f"device     {d['name']} ({d.get('capability')}), torch {d['torch']}, CUDA {d['cuda']}, "
             f"NCCL {d.get('nccl')}, ray {d.get('ray')}; bf16 peak "
             f"{_fmt(peak['tflops'], '.0f', ' TFLOP/s')} ({peak['source']})"]
    rows: list[tuple[str, str, str]] = []
    p = r.get("pretrain")
    if isinstance(p, dict) and "samples_per_s" in p:
        rows += [
            ("pretrain", f"samples/s ({r['setup']['encoder']}, batch {p['batch']}, {p['precision']}, "
                         f"{p['backend']} x{p['world_size']})", _fmt(p["samples_per_s"])),
            ("", "model GFLOP/sample (FlopCounterMode)", _fmt(p["flops_per_sample"] / 1e9, ".3g")),
            ("", "achieved TFLOP/s", _fmt(p["achieved_tflops"], ".2f")),
            ("", "MFU", _pct(p["mfu"])),
        ]
        if p.get("h2d_samples_per_s_ceiling") is not None:  # GPU only
            rows += [
                ("", f"H2D copy of a loader batch (unpinned), samples/s cap ({_fmt(p['h2d_gb_per_s'])} GB/s)",
                 _fmt(p["h2d_samples_per_s_ceiling"])),
                ("", "peak GPU memory GiB", _fmt(p["peak_mem_gib"])),
            ]
        rows.append(("", "parameters, millions", _fmt(p["params"] / 1e6)))
    elif p is not None:
        rows.append(("pretrain", "FAILED", str(p.get("error", ""))[:80]))
    f = r.get("features")
    if isinstance(f, dict) and "actor_path" in f:
        a = f["actor_path"]
        rows.append(("features", f"FrameEncoderActor frames/s ({f['frame_encoder']} {f['image_size']} px, "
                                 f"batch {a['batch']}, {100 * a['augmented_share']:.0f} % augmented)",
                     _fmt(a["frames_per_s"])))
        for e in f["encoder_only"]:
            rows.append(("", f"encoder forward frames/s, batch {e['batch']} "
                             f"({_fmt(e['flops_per_frame'] / 1e9, '.3g')} GFLOP/frame)", _fmt(e["frames_per_s"])))
            rows.append(("", f"  achieved TFLOP/s / MFU, batch {e['batch']}",
                         f"{_fmt(e['achieved_tflops'], '.2f')} / {_pct(e['mfu'])}"))
    elif f is not None:
        rows.append(("features", "FAILED", str(f.get("error", ""))[:80]))
    dp = r.get("data")
    if isinstance(dp, dict) and "samples_per_s_per_core" in dp:
        rows.append(("data", f"samples/s per core (loader workers {dp['loader_workers']}, batch {dp['batch']}, "
                             f"{_fmt(dp['angio_feats_mb_per_sample'], '.3g')} MB features/sample)",
                     _fmt(dp["samples_per_s_per_core"])))
    elif dp is not None:
        rows.append(("data", "FAILED", str(dp.get("error", ""))[:80]))
    feed = r.get("feed", {})
    if feed.get("cores_needed") is not None:
        rows.append(("feed", f"CPU cores to feed the GPU's samples/s (this machine: {feed['cores_available']})",
                     _fmt(feed["cores_needed"])))
    width = max([len(b) for _, b, _ in rows] + [10])
    lines += [f"{a:10s} {b:{width}s} {c:>12s}" for a, b, c in rows]
    return "\n".join(lines)


def _write(path: Path, result: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(result, indent=2, default=str))
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------------
# main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=None,
                   help="time budget that sizes the timed windows (default 6; 0.1 with --cpu-smoke)")
    p.add_argument("--encoder", default=None, help="ECG encoder registry name (default otis_base; otis_tiny "
                   "with --cpu-smoke)")
    p.add_argument("--batch", type=int, default=None, help="pretraining batch on the one worker (default 128; 8 "
                   "with --cpu-smoke)")
    p.add_argument("--views", type=int, default=None, help="angiography views per study (default 4; 2 smoke)")
    p.add_argument("--config", default=None, help="YAML config (default configs/paper.yaml; built-in defaults "
                   "with --cpu-smoke)")
    p.add_argument("--cohort", default=None, help="an ingested cohort to use instead of a synthetic one made "
                   "here (only read; its key frames feed the feature part, its ECGs the data part)")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    p.add_argument("--loader-workers", type=int, default=None,
                   help="DataLoader workers of the data part (default min(4, cores); 1 with --cpu-smoke)")
    p.add_argument("--data-batch", type=int, default=16, help="loader batch of the data part (per-core rate "
                   "barely depends on it; a large one only fills shared memory)")
    p.add_argument("--peak-tflops", type=float, default=None, help="bf16 dense peak to use instead of the table")
    p.add_argument("--cpu-smoke", action="store_true", help="the same path on CPU, tiny models, a few steps")
    p.add_argument("--out", default="bench/results/gpu_check.json")
    args = p.parse_args(argv)
    smoke = args.cpu_smoke
    args.minutes = args.minutes if args.minutes is not None else (0.1 if smoke else 6.0)
    args.encoder = args.encoder or ("otis_tiny" if smoke else "otis_base")
    args.batch = args.batch or (8 if smoke else 128)
    args.views = args.views or (2 if smoke else 4)
    if args.loader_workers is None:
        args.loader_workers = 1 if smoke else min(4, os.cpu_count() or 1)
    args.parts = [s.strip() for s in args.parts.split(",") if s.strip()]
    unknown = sorted(set(args.parts) - set(PARTS))
    if unknown:
        p.error(f"--parts: unknown {unknown}; valid: {list(PARTS)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    why = refusal(args)
    if why:
        print(why, file=sys.stderr)
        return 2
    t_start = time.perf_counter()
    os.environ.setdefault("STENCE_SALT", "gpu-check-secret")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    gpu = not args.cpu_smoke
    out = Path(args.out)
    smoke = args.cpu_smoke
    warmup, min_steps = (1, 2) if smoke else (10, 20)
    window = {k: v * args.minutes * 60 for k, v in WINDOW_SHARE.items()}
    dev = device_info(gpu)
    peak, source = (None, "cpu smoke: no peak") if smoke else peak_bf16_tflops(dev["name"])
    if args.peak_tflops:
        peak, source = args.peak_tflops, "--peak-tflops"
    result: dict[str, Any] = {
        "check": "gpu_check", "mode": "cpu-smoke" if smoke else "gpu", "command": [sys.executable, "-m",
                                                                                   "bench.gpu_check", *sys.argv[1:]],
        "argv": argv if argv is not None else sys.argv[1:], "device": dev,
        "peak": {"tflops": peak, "source": source}, "timings": {}, "windows_s": window,
    }
    print(f"gpu_check: {dev['name']} ({dev.get('capability')}), torch {dev['torch']}, CUDA {dev['cuda']}, "
          f"bf16 peak {_fmt(peak, '.0f', ' TFLOP/s')} ({source}); parts {args.parts}", flush=True)
    failed = False
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        cfg = check_config(args, str(Path(tmp) / "ray"))
        patches = frame_patches(cfg)
        result["setup"] = {"encoder": args.encoder, "batch": args.batch, "views": args.views, "patches": patches,
                           "feature_dim": cfg.feature.feature_dim, "frame_encoder": cfg.feature.frame_encoder,
                           "image_size": cfg.feature.image_size, "frame_size": cfg.data.frame_size,
                           "variants": cfg.feature.variants, "angio_dim": cfg.model.angio_dim,
                           "config": str(args.config or ("defaults" if smoke else PAPER_CONFIG))}
        cohort = Path(args.cohort).resolve() if args.cohort else None
        if cohort is None and ("data" in args.parts or "features" in args.parts):
            t = time.perf_counter()
            # smoke: decode in this process (a spawned pool costs more than the few files)
            cohort = make_cohort(cfg, Path(tmp), patients=8 if smoke else 24, views=args.views,
                                 processes=1 if smoke else max(1, min(4, os.cpu_count() or 1)))
            result["timings"]["cohort_s"] = time.perf_counter() - t
        result["setup"]["cohort"] = str(args.cohort or "synthetic")
        if "data" in args.parts:
            print("data path ...", flush=True)
            try:
                t = time.perf_counter()
                store = write_feature_store(cohort, Path(tmp) / "features", cfg.feature.variants, patches,
                                            cfg.feature.feature_dim)
                result["data"] = run_data_path(cfg, cohort, store, workers=args.loader_workers,
                                               batch=args.data_batch, seconds=window["data"],
                                               warmup_batches=2 * max(1, args.loader_workers) + 1,
                                               min_batches=2)
                result["timings"]["data_s"] = time.perf_counter() - t
            except Exception as e:  # noqa: BLE001 - report it, run the other parts
                failed = True
                result["data"] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
            _write(out, result)
        if "pretrain" in args.parts or "features" in args.parts:
            from stence.train.driver import ensure_ray

            t = time.perf_counter()
            ensure_ray()
            result["timings"]["ray_start_s"] = time.perf_counter() - t
        if "pretrain" in args.parts:
            print("pretraining ...", flush=True)
            try:
                p = run_pretrain(cfg, views=args.views, patches=patches, seconds=window["pretrain"],
                                 warmup_steps=warmup, min_steps=min_steps)
                p.update(throughput_figures(p["flops_per_sample"], p["samples_per_s"], peak))
                if not p["loss_finite"]:
                    raise RuntimeError(f"the training loss is not finite ({p['loss']})")
                result["pretrain"] = p
                result["timings"]["pretrain_s"] = p["fit_wall_s"]
            except Exception as e:  # noqa: BLE001
                failed = True
                result["pretrain"] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
            _write(out, result)
        if "features" in args.parts:
            print("feature extraction ...", flush=True)
            try:
                t = time.perf_counter()
                result["features"] = run_features(cfg, str(cohort), gpu=gpu, seconds=window["features"],
                                                  warmup=warmup, min_batches=min_steps, peak=peak)
                result["timings"]["features_s"] = time.perf_counter() - t
            except Exception as e:  # noqa: BLE001
                failed = True
                result["features"] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
    gpu_sps = result.get("pretrain", {}).get("samples_per_s")
    per_core = result.get("data", {}).get("samples_per_s_per_core")
    result["feed"] = {"cores_needed": cores_needed(gpu_sps, per_core), "cores_available": os.cpu_count()}
    result["timings"]["total_s"] = time.perf_counter() - t_start
    _write(out, result)
    print(format_table(result))
    for part in PARTS:
        err = result.get(part, {}).get("error") if isinstance(result.get(part), dict) else None
        if err:
            print(f"{part} FAILED: {err}", file=sys.stderr)
    print(f"total {result['timings']['total_s']:.0f} s; wrote {out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
