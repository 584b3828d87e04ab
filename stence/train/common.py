"""Pieces shared by the per-worker loops: setup, loaders, DDP wrapping, sharded inference."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, RandomSampler, Subset

from stence.config import Config, from_dict
from stence.tracking.runs import NullTracker, Tracker, tracker_for_loop
from stence.train.worker import WorkerInfo, all_gather_arrays, seed_everything, worker_info


@dataclass
class LoopContext:
    cfg: Config
    info: WorkerInfo
    tracker: Tracker | NullTracker


def loop_setup(loop_config: dict[str, Any]) -> LoopContext:
    """Resolved config, rank/device, seeds, thread count and the rank-0 tracker of a per-worker loop."""
    cfg = from_dict(loop_config["config"])
    info = worker_info()
    seed_everything(cfg.train.seed, info.rank)
    if info.device.type == "cpu":
        torch.set_num_threads(max(1, cfg.train.cpus_per_worker))
    return LoopContext(cfg, info, tracker_for_loop(loop_config, info.rank))


def train_loader(ds: Dataset, global_batch: int, info: WorkerInfo, collate: Callable | None, seed: int,
                 num_workers: int = 0) -> tuple[DataLoader, DistributedSampler | RandomSampler]:
    """Shuffled loader of this rank's share: DistributedSampler when distributed (call its set_epoch)."""
    per_rank = max(1, global_batch // info.world_size)
    if info.world_size > 1:
        sampler = DistributedSampler(ds, num_replicas=info.world_size, rank=info.rank, shuffle=True, seed=seed,
                                     drop_last=True)
    else:
        sampler = RandomSampler(ds, generator=torch.Generator().manual_seed(seed))
    drop_last = len(ds) // info.world_size > per_rank  # keep the last partial batch on tiny cohorts
    loader = DataLoader(ds, batch_size=per_rank, sampler=sampler, collate_fn=collate, drop_last=drop_last,
                        num_workers=num_workers)
    return loader, sampler


def set_epoch(sampler: Any, datasets: list[Any], epoch: int, seed: int) -> None:
    """Reshuffle (DistributedSampler) and re-seed per-item randomness for the epoch."""
    if hasattr(sampler, "set_epoch"):
        sampler.set_epoch(epoch)
    elif isinstance(sampler, RandomSampler) and sampler.generator is not None:
        sampler.generator.manual_seed(seed * 100_003 + epoch)
    for ds in datasets:
        ds.set_epoch(epoch)


def shard_loader(ds: Dataset, batch: int, info: WorkerInfo, collate: Callable | None) -> DataLoader:
    """Deterministic evaluation loader over this rank's strided share (no padding duplicates)."""
    idx = list(range(info.rank, len(ds), info.world_size))
    return DataLoader(Subset(ds, idx), batch_size=batch, shuffle=False, collate_fn=collate)


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def wrap_model(model: nn.Module, info: WorkerInfo, find_unused: bool = False) -> nn.Module:
    """DDP-wrap when distributed (Ray picks gloo on CPU, nccl on GPU). Parameters that sit out a step
    (e.g. the stenosis head with w_sten=0) need find_unused=True."""
    if info.world_size > 1:
        import ray.train.torch  # ray.train.torch (~3 s to import): only for a distributed run

        # gradient_as_bucket_view: gradients live in the all-reduce buckets (one copy less per step)
        return ray.train.torch.prepare_model(model, parallel_strategy_kwargs={
            "find_unused_parameters": find_unused, "gradient_as_bucket_view": True})
    return model.to(info.device)


def ddp_diagnostics(model: nn.Module) -> dict[str, float]:
    """Proof that data parallelism is real: world size, distinct worker processes, and the spread of
    parameter checksums across ranks (0 when every replica holds the same weights)."""
    checksum = sum(float(p.detach().double().sum()) for p in unwrap(model).parameters())
    rows = all_gather_arrays(np.array([[checksum, os.getpid()]], dtype=np.float64))  # (world, 2)
    return {"ddp/world_size": float(len(rows)), "ddp/distinct_pids": float(len(set(rows[:, 1]))),
            "ddp/param_spread": float(rows[:, 0].max() - rows[:, 0].min()),
            "ddp/wrapped": float(isinstance(model, nn.parallel.DistributedDataParallel))}


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def autocast(info: WorkerInfo):
    """bf16 autocast on GPU, a no-op context on CPU."""
    return torch.autocast(info.device.type, dtype=torch.bfloat16, enabled=info.device.type == "cuda")


def gather_outputs(batches: Iterator[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Concatenate per-batch numpy dicts on this rank, then across ranks; rows ordered by 'index'."""
    parts: dict[str, list[np.ndarray]] = {}
    for b in batches:
        for k, v in b.items():
            parts.setdefault(k, []).append(v)
    local = {k: np.concatenate(v) for k, v in parts.items()}
    out = {k: all_gather_arrays(v) for k, v in sorted(local.items())}
    order = np.argsort(out["index"], kind="stable")
    return {k: v[order] for k, v in out.items()}
