"""A toy per-worker loop that exercises the training plumbing the way the real stages do.

Linear regression whose prediction is divided by a learnable temperature held in the same parent
module (so DDP wraps both), two parameter groups with their own learning rates (optim.lr_ecg for the
linear "tower", optim.lr_angio for the temperature), a DistributedSampler with set_epoch, a
weight-decay-like penalty weighted by loss.w_sten, validation split over ranks and all-reduced, and a
checkpoint per epoch. The validation score therefore depends on the sampled hyper-parameters, which
gives TPE something to find.

For the tests the loop also writes, per rank and epoch, the facts that prove DDP is real (`facts`
JSON lines) and an epoch event log (`events.log`); and it waits after each report while a "hold" file
exists, so that a test can kill a worker or interrupt a sweep at a known point.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from stence.config import Config, from_dict
from stence.tracking.client import resolve_tracking_uri
from stence.tracking.runs import loop_tracking, tracker_for_loop
from stence.train.driver import fit, tune_trial_id
from stence.train.schedule import param_groups, warmup_cosine
from stence.train.worker import (
    all_gather_arrays,
    all_reduce_mean,
    all_reduce_sum,
    load_latest_state,
    print0,
    report,
    report_restored,
    seed_everything,
    worker_info,
)

METRIC = "val/score"
TOY_PARAMS = {  # what the toy sweeps search: the toy's score depends on both
    "loss.w_sten": {"type": "uniform", "low": 0.0, "high": 1.0},
    "optim.lr_ecg": {"type": "loguniform", "low": 1e-3, "high": 1e-1},
}
N_TRAIN, N_VAL, DIM = 256, 61, 8  # 61 validation rows: ranks get unequal shards


class Temperature(nn.Module):
    def __init__(self, value: float):
        super().__init__()
        self.log_temperature = nn.Parameter(torch.tensor(math.log(value)))

    def forward(self) -> torch.Tensor:
        return self.log_temperature.exp()


class ToyModel(nn.Module):
    """Linear tower + learnable temperature in one parent module."""

    def __init__(self, dim: int, temperature: float):
        super().__init__()
        self.encoder = nn.Linear(dim, 1)
        self.temperature = Temperature(temperature)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x).squeeze(-1) / self.temperature()  # (B, D) -> (B,)


def toy_data() -> tuple[torch.Tensor, ...]:
    """The same seeded regression problem on every rank."""
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(N_TRAIN + N_VAL, DIM, generator=g)
    w = torch.randn(DIM, generator=g)
    y = x @ w + 0.1 * torch.randn(N_TRAIN + N_VAL, generator=g)
    return x[:N_TRAIN], y[:N_TRAIN], x[N_TRAIN:], y[N_TRAIN:]


def _append(path: Path | None, line: str) -> None:
    if path is not None:
        with open(path, "a") as f:
            f.write(line + "\n")


def _checksum(model: nn.Module) -> float:
    return float(sum(p.detach().double().sum() for p in model.parameters()))


def toy_loop(config: dict[str, Any]) -> dict[str, Any]:
    """Per-worker loop: config = {"config": resolved Config dict, **loop_config}."""
    import ray.train.torch

    cfg: Config = from_dict(config["config"])
    log_dir = Path(config["log_dir"]) if config.get("log_dir") else None
    info = worker_info()
    seed_everything(cfg.train.seed, info.rank)
    tracker = tracker_for_loop(config, info.rank)

    x_tr, y_tr, x_va, y_va = toy_data()
    torch.manual_seed(cfg.train.seed)  # same init everywhere (DDP would broadcast rank 0's anyway)
    model = ray.train.torch.prepare_model(ToyModel(DIM, cfg.loss.temperature))
    inner = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    groups = param_groups(inner.encoder, cfg.optim.lr_ecg, cfg.optim.weight_decay)
    groups += param_groups(inner.temperature, cfg.optim.lr_angio, cfg.optim.weight_decay)
    optimizer = torch.optim.AdamW(groups)
    loader = DataLoader(
        TensorDataset(x_tr, y_tr), batch_size=max(1, cfg.optim.batch_size // info.world_size), shuffle=True
    )
    loader = ray.train.torch.prepare_data_loader(loader, move_to_device=False)
    steps_per_epoch = len(loader)
    scheduler = warmup_cosine(
        optimizer,
        cfg.optim.warmup_epochs * steps_per_epoch,
        cfg.optim.epochs * steps_per_epoch,
        start_factor=cfg.optim.warmup_start,
        min_lr=cfg.optim.min_lr,
    )

    start_epoch, reported = 0, []
    state = load_latest_state()
    if state is not None:
        inner.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch = state["epoch"] + 1
        tracker.refill(state.get("tracked"))
        reported = list(state.get("reported", []))
        report_restored(reported, start_epoch)  # as the real loops do: Tune sees the restored epochs again
        if config.get("ack_dir"):  # lockstep: go on only once the driver took the restored epochs
            _wait_for_ack(Path(config["ack_dir"]) / f"{config['trial_id']}-{start_epoch}", float(config.get("hold_max_s", 60.0)))
        print0(f"resuming after epoch {state['epoch']}")
    _append(
        log_dir and log_dir / "events.log", f"begin rank={info.rank} pid={os.getpid()} start={start_epoch}"
    )
    if log_dir is not None:
        (log_dir / f"pid_rank{info.rank}.txt").write_text(str(os.getpid()))

    metrics: dict[str, float] = {}
    for epoch in range(start_epoch, cfg.optim.epochs):
        _append(log_dir and log_dir / "events.log", f"start epoch={epoch} rank={info.rank} pid={os.getpid()}")
        if isinstance(loader.sampler, torch.utils.data.DistributedSampler):
            loader.sampler.set_epoch(epoch)
        model.train()
        seen, loss_sum = 0, 0.0
        for step, (xb, yb) in enumerate(loader):
            if step == 1 and config.get("hold_mid_file") and _holds_mid(epoch, config.get("hold_mid_epoch")):
                # mid-epoch, for a kill there
                _append(log_dir and log_dir / "events.log", f"mid epoch={epoch} rank={info.rank} pid={os.getpid()}")
                _hold(config.get("hold_mid_file"), float(config.get("hold_max_s", 60.0)))
            pred = model(xb)
            penalty = inner.encoder.weight.pow(2).sum()
            loss = nn.functional.mse_loss(pred, yb) + cfg.loss.w_sten * 0.1 * penalty
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
            seen += len(xb)
            loss_sum += float(loss.detach()) * len(xb)

        # validation: each rank scores its own (unequal) shard; weighted all-reduce and gather agree
        model.eval()
        with torch.no_grad():
            shard = slice(info.rank, None, info.world_size)
            pred_va = model(x_va[shard])
            mse = float(nn.functional.mse_loss(pred_va, y_va[shard]))
        val = all_reduce_mean({"val/mse": mse}, weight=len(pred_va))
        gathered = all_gather_arrays(np.stack([pred_va.numpy(), y_va[shard].numpy()], axis=1))  # (N_VAL, 2)
        train = all_reduce_mean({"train/loss": loss_sum / max(1, seen)}, weight=seen)
        metrics = {
            "epoch": epoch,
            METRIC: -val["val/mse"],
            "val/mse": val["val/mse"],
            "val/mse_gathered": float(np.mean((gathered[:, 0] - gathered[:, 1]) ** 2)),
            "train/loss": train["train/loss"],
            "lr": scheduler.get_last_lr()[0],
        }
        if log_dir is not None:
            facts = {
                "epoch": epoch,
                "rank": info.rank,
                "world_size": info.world_size,
                "pid": os.getpid(),
                "backend": dist.get_backend() if dist.is_initialized() else None,
                "ddp": isinstance(model, nn.parallel.DistributedDataParallel),
                "rank_sum": all_reduce_sum({"rank": float(info.rank)})["rank"],
                "checksum": _checksum(inner),
                "n_gathered": int(gathered.shape[0]),
                "tracker": type(tracker).__name__,
                "sampler": type(loader.sampler).__name__,
                **metrics,
            }
            _append(log_dir / f"facts_rank{info.rank}.jsonl", json.dumps(facts))
        reported.append({k: float(v) for k, v in metrics.items()})
        report(
            metrics,
            state={
                "model": inner.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "epoch": epoch,
                "config": config["config"],
                "tracked": tracker.stamp(metrics, step=epoch),
                "reported": reported,
            },
            iteration=epoch + 1,
        )
        tracker.log_metrics(metrics, step=epoch)  # after the checkpoint, as the real loops do
        _append(log_dir and log_dir / "events.log", f"end epoch={epoch} rank={info.rank} pid={os.getpid()}")
        _hold(config.get("hold_file"), float(config.get("hold_max_s", 60.0)))
        if config.get("ack_dir"):  # lockstep with the sweep driver: wait until it has taken this epoch
            _wait_for_ack(Path(config["ack_dir"]) / f"{config['trial_id']}-{epoch + 1}", float(config.get("hold_max_s", 60.0)))
    return metrics


def _holds_mid(epoch: int, at: int | None) -> bool:
    """Whether `epoch` waits mid-epoch for the hold_mid_file: only epoch `at` when given (a test that kills a
    worker in epoch 2 must not first sit out hold_max_s in epoch 1), else every epoch after the first."""
    return epoch == at if at is not None else epoch >= 1


def _hold(path: str | None, max_s: float) -> None:
    """Wait (after a report, or mid-epoch) while `path` exists: a test kills a worker or interrupts a sweep
    meanwhile."""
    t0 = time.monotonic()
    while path and os.path.exists(path) and time.monotonic() - t0 < max_s:
        time.sleep(0.1)


def _wait_for_ack(path: Path, max_s: float) -> None:
    """Wait until `path` exists (the sweep driver took the epoch and let the trial go on)."""
    t0 = time.monotonic()
    while not path.exists() and time.monotonic() - t0 < max_s:
        time.sleep(0.05)


def collectives_probe(rank: int, world: int, port: int, out_dir: str) -> None:
    """torch.multiprocessing entry point (kept in this light module so spawned children import little):
    run the collective helpers on a plain gloo group with unequal shards and write what they return."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        n = 3 if rank == 0 else 5
        rows = np.full((n, 2), rank, dtype=np.float32) + np.arange(n, dtype=np.float32)[:, None]  # (n, 2)
        flags = np.array([rank == 0] * n)
        res = {
            "gathered": all_gather_arrays(rows).tolist(),
            "flags": all_gather_arrays(flags).tolist(),
            "sum": all_reduce_sum({"rank": rank, "one": 1.0}),
            # local means 1.0 (3 samples) and 3.0 (5 samples): weighted global mean 2.25
            "mean": all_reduce_mean({"m": 1.0 if rank == 0 else 3.0}, weight=n),
        }
        Path(out_dir, f"r{rank}.json").write_text(json.dumps(res))
    finally:
        dist.destroy_process_group()


def toy_train_fn(
    cfg: Config, run_id: str | None, log_dir: str | None = None, hold_file: str | None = None,
    hold_mid_file: str | None = None, ack_dir: str | None = None, hold_mid_epoch: int | None = None,
) -> Any:
    """The driver a sweep calls per trial (and a single run calls once): fit the toy loop. With `ack_dir`
    every epoch waits, after its report, for the sweep driver's `<trial id>-<epoch>` file there."""
    uri = resolve_tracking_uri(cfg) if run_id else None
    loop_config = {"log_dir": log_dir, "hold_file": hold_file, "hold_mid_file": hold_mid_file,
                   "hold_mid_epoch": hold_mid_epoch,
                   "ack_dir": ack_dir, "trial_id": tune_trial_id(), **loop_tracking(uri, run_id)}
    return fit(toy_loop, cfg, stage="toy", loop_config=loop_config, metric=METRIC, mode="max")
