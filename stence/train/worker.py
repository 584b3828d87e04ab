"""Helpers called inside Ray Train per-worker loops.

Every helper also works in Ray Train local mode (`ScalingConfig(num_workers=0)`, the loop runs in the
driver process) and, apart from `report`/`load_latest_state`, outside Ray entirely: collectives are
no-ops when `torch.distributed` is not initialised. Loops then read the same whatever the world size:

    info = worker_info()
    state = load_latest_state()             # None on a fresh run
    ...
    val = all_reduce_mean({"val/loss": loss_sum / n}, weight=n)
    report({"epoch": epoch, **val}, state={"model": model.state_dict(), "epoch": epoch, ...})
"""

from __future__ import annotations

import json
import random
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from stence.train.local_mode import keep_local, local_best_checkpoint, select_local_best

STATE_FILE = "state.pt"  # torch.save'd dict inside every checkpoint directory
METRICS_FILE = "metrics.json"  # the metrics reported with the checkpoint, for humans and tools
ITERATION_KEY = "training_iteration"  # Tune's epoch counter; a reported value wins over Tune's own count
TRACKED_FILE = "tracked.json"  # the epoch's tracking stamp (Tracker.stamp), beside the state
RESTORED_KEY = "stence/restored"  # on a result that repeats a restored checkpoint's epoch (`report_restored`)


@dataclass(frozen=True)
class WorkerInfo:
    rank: int  # global rank (0 writes checkpoints and tracking)
    world_size: int
    local_rank: int  # rank on this node (GPU index)
    device: torch.device


def _train_context() -> Any | None:
    """The Ray Train context, or None outside a Ray Train loop (plain process or Tune driver)."""
    try:
        import ray.train  # ray.train (~1 s to import): only when asked for a Ray Train context

        return ray.train.get_context()
    except (RuntimeError, DeprecationWarning, ImportError):
        return None


def _is_local_mode() -> bool:
    """True in Ray Train local mode: Ray does not persist checkpoints there."""
    from ray.train.v2.api.context import LocalTrainContext  # ray.train (~1 s to import): only on a report

    return isinstance(_train_context(), LocalTrainContext)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def worker_info() -> WorkerInfo:
    """Rank, world size, local rank and torch device of this worker (rank 0 of 1 outside Ray Train)."""
    ctx = _train_context()
    if ctx is None:
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None
        return WorkerInfo(0, 1, 0, device or torch.device("cpu"))
    import ray.train.torch  # ray.train.torch (~3 s to import): only inside a Ray Train run

    return WorkerInfo(
        rank=ctx.get_world_rank(),
        world_size=ctx.get_world_size(),
        local_rank=ctx.get_local_rank(),
        device=ray.train.torch.get_device(),
    )


def print0(*args: Any) -> None:
    """print() on rank 0 only, flushed (worker stdout is streamed to the driver by Ray)."""
    if worker_info().rank == 0:
        print(*args, flush=True)


def seed_everything(seed: int, rank: int = 0) -> None:
    """Seed python, numpy and torch with seed + rank: shuffles and augmentations differ per rank,
    while DDP still starts every rank from rank 0's weights (it broadcasts them on wrapping)."""
    s = int(seed) + int(rank)
    random.seed(s)
    np.random.seed(s % 2**32)
    torch.manual_seed(s)


def _collective_device() -> torch.device:
    """NCCL reduces CUDA tensors only; gloo reduces CPU tensors."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(t: dict[str, float]) -> dict[str, float]:
    """Sum scalar values over ranks (every rank must pass the same keys). No-op when not distributed."""
    out = {k: float(v) for k, v in t.items()}
    if not _distributed() or not out:
        return out
    keys = sorted(out)
    buf = torch.tensor([out[k] for k in keys], dtype=torch.float64, device=_collective_device())  # (K,)
    dist.all_reduce(buf, op=dist.ReduceOp.SUM)
    return dict(zip(keys, buf.cpu().tolist(), strict=True))


def all_reduce_mean(metrics: dict[str, float], weight: float) -> dict[str, float]:
    """Sample-weighted mean over ranks: each rank passes its local means and its sample count."""
    w = float(weight)
    sums = all_reduce_sum({**{k: float(v) * w for k, v in metrics.items()}, "\0weight": w})
    total = sums.pop("\0weight")
    return {k: (v / total if total > 0 else float("nan")) for k, v in sums.items()}


def all_gather_arrays(x: np.ndarray) -> np.ndarray:
    """Concatenate every rank's rows (rank order) on every rank; row counts may differ per rank.

    Rows are padded to the largest count, gathered, and trimmed with the gathered sizes. Trailing
    dimensions and dtype must agree across ranks. Used to score validation embeddings globally.
    """
    x = np.ascontiguousarray(x)
    if not _distributed():
        return x.copy()
    is_bool = x.dtype == np.bool_
    src = x.astype(np.uint8) if is_bool else x
    device = _collective_device()
    world = dist.get_world_size()
    n = torch.tensor([src.shape[0]], dtype=torch.int64, device=device)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    counts = [int(s.item()) for s in sizes]
    padded = np.zeros((max(counts), *src.shape[1:]), dtype=src.dtype)  # (N_max, ...)
    padded[: src.shape[0]] = src
    local = torch.from_numpy(padded).to(device)
    parts = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(parts, local)
    out = np.concatenate([p[:c].cpu().numpy() for p, c in zip(parts, counts, strict=True)])  # (sum N, ...)
    return out.astype(np.bool_) if is_bool else out


def _write_checkpoint_dir(path: Path, metrics: dict[str, Any], state: dict[str, Any]) -> None:
    torch.save(state, path / STATE_FILE)
    (path / METRICS_FILE).write_text(json.dumps(metrics, default=float, indent=1))
    if state.get("tracked"):  # readable without loading the state: see `latest_tracked_stamp`
        (path / TRACKED_FILE).write_text(json.dumps(state["tracked"], default=float))


def latest_tracked_stamp(run_dir: str | Path) -> dict[str, Any] | None:
    """The tracking stamp (run id, step, metrics) of the newest checkpoint of a Train run folder; None when it
    has none. The sweep driver logs it for a trial stopped before its worker logged that epoch."""
    stamps = sorted(Path(run_dir).glob(f"checkpoint_*/{TRACKED_FILE}"))  # checkpoint_<timestamp>: in time order
    for path in reversed(stamps):
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):  # being written, or removed by checkpoint rotation meanwhile
            continue
    return None


def report(metrics: dict[str, Any], state: dict[str, Any] | None = None, iteration: int | None = None) -> None:
    """Report metrics (and a checkpoint) to Ray Train. Every rank must call it: it is a barrier.

    `iteration` (the number of epochs done) goes out as `training_iteration`: Tune keeps a reported one, so
    ASHA's rungs and the trial-epoch budget count epochs even when a trial restarts from its checkpoint
    (Tune's own count restarts at 1 when a resumed sweep starts the trial function again).

    Rank 0 saves `state` (state_dicts, epoch, resolved config ...) with torch.save and attaches it as a
    checkpoint; other ranks report without one. Only rank 0's metrics are kept, so pass metrics that
    are already all-reduced. Ray Train V2 persists metrics only together with a checkpoint: a report
    without `state` is seen by Tune (through TuneReportCallback) but is absent from `Result.metrics`.
    In local mode Ray keeps only the last checkpoint object and not its files: the directory is then
    a kept temporary one, and the run's previous one is removed.
    """
    import ray.train  # ray.train (~1 s to import): the rest of this module works without Ray

    info = worker_info()
    if iteration is not None:
        metrics = {**metrics, ITERATION_KEY: int(iteration)}
    if state is None or info.rank != 0:
        ray.train.report(metrics, checkpoint=None)
        return
    if _is_local_mode():
        path = Path(tempfile.mkdtemp(prefix="stence-local-ckpt-"))
        _write_checkpoint_dir(path, metrics, state)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(path)))
        keep_local(path, metrics, _train_context())
        return
    with tempfile.TemporaryDirectory(prefix="stence-ckpt-") as tmp:
        _write_checkpoint_dir(Path(tmp), metrics, state)
        # SYNC upload (the default) copies the directory to storage before report() returns.
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def load_state(checkpoint: Any, map_location: str | torch.device = "cpu", weights_only: bool = True) -> dict:
    """The state dict saved by `report` inside a `ray.train.Checkpoint` (or a checkpoint directory).

    `weights_only=True` refuses arbitrary pickles; pass False only for trusted checkpoints that hold
    non-tensor objects (e.g. numpy RNG state).
    """
    if not hasattr(checkpoint, "as_directory"):  # a path (ray.train.Checkpoint is PathLike but refuses)
        return torch.load(Path(checkpoint) / STATE_FILE, map_location=map_location, weights_only=weights_only)
    with checkpoint.as_directory() as d:
        return torch.load(Path(d) / STATE_FILE, map_location=map_location, weights_only=weights_only)


def report_restored(reported: list[dict[str, float]] | None, iteration: int) -> None:
    """After a restore: report again, marked `RESTORED_KEY`, the metrics of every epoch up to the restored
    checkpoint (`reported[i]` is epoch i + 1's; a checkpoint without them: its own metrics as epoch
    `iteration`). A resumed sweep's snapshot may predate some of those reports (the sweep driver died after
    they were made); these give ASHA and Optuna the epochs they would otherwise never see, in their order.
    Epochs they saw already repeat a `training_iteration` a rung holds: ASHA, the budget and the summary
    pass over them. Every rank must call it (a barrier), and only when resuming from a checkpoint."""
    import ray.train  # ray.train (~1 s to import): the rest of this module works without Ray

    epochs = list(enumerate(reported or [], start=1))
    if not epochs:
        with ray.train.get_checkpoint().as_directory() as d:
            path = Path(d) / METRICS_FILE
            epochs = [(iteration, json.loads(path.read_text()) if path.exists() else {})]
    for epoch, metrics in epochs:
        report({**metrics, RESTORED_KEY: 1.0}, None, iteration=epoch)


def load_latest_state(map_location: str | torch.device = "cpu", weights_only: bool = True) -> dict | None:
    """State of the latest reported checkpoint when the run is resuming (same run name, or a worker
    group restarted after a failure); None on a fresh run and in local mode."""
    import ray.train  # ray.train (~1 s to import): the rest of this module works without Ray

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return None
    return load_state(checkpoint, map_location=map_location, weights_only=weights_only)


__all__ = [
    "METRICS_FILE",
    "STATE_FILE",
    "WorkerInfo",
    "all_gather_arrays",
    "all_reduce_mean",
    "all_reduce_sum",
    "load_latest_state",
    "latest_tracked_stamp",
    "load_state",
    "local_best_checkpoint",
    "print0",
    "report",
    "report_restored",
    "seed_everything",
    "select_local_best",
    "worker_info",
]
