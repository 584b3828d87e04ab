"""Ray Train local mode (`train.workers=0`): the loop runs in the driver's process, and Ray keeps only the last
checkpoint object of a run, not its files. Here: the metric that picks a local run's best checkpoint (set by the
driver, as CheckpointConfig does for Ray-managed runs) and which checkpoint directories stay on disk.

Neither torch nor Ray is imported here: the driver, which light command code imports, sets the metric."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

_LOCAL_LAST: dict[str, Any] = {}  # local mode: the run's context, its last and best checkpoint dirs
_LOCAL_SELECT: dict[str, str] = {}  # local mode: the metric (and mode) that picks the best checkpoint


def select_local_best(metric: str, mode: str = "max") -> None:
    """Local mode runs in the driver's process: the driver names the metric that picks the best
    checkpoint, as CheckpointConfig does for Ray-managed runs."""
    _LOCAL_SELECT.update(metric=metric, mode=mode)


def _better(value: Any, best: Any, mode: str) -> bool:
    if not isinstance(value, (int, float)) or value != value:  # missing or NaN never wins
        return False
    return best is None or (value > best if mode == "max" else value < best)


def keep_local(path: Path, metrics: dict[str, Any], ctx: Any) -> None:
    """Local mode keeps only the last checkpoint object of a run and not its files: keep this run's
    last directory and its best one (by the selected metric), remove any other. `ctx` is the run's Ray Train
    context (one object per run, held here, so it is never a new run's)."""
    if _LOCAL_LAST.get("ctx") is not ctx:
        _LOCAL_LAST.clear()
        _LOCAL_LAST.update(ctx=ctx, path=None, best=None, best_value=None)
    value = metrics.get(_LOCAL_SELECT.get("metric", ""))
    old_last, old_best = _LOCAL_LAST["path"], _LOCAL_LAST["best"]
    if _better(value, _LOCAL_LAST["best_value"], _LOCAL_SELECT.get("mode", "max")) or old_best is None:
        _LOCAL_LAST.update(best=path, best_value=value if isinstance(value, (int, float)) else None)
    _LOCAL_LAST["path"] = path
    for old in {old_last, old_best} - {None, _LOCAL_LAST["path"], _LOCAL_LAST["best"]}:
        shutil.rmtree(old, ignore_errors=True)


def local_best_checkpoint() -> Path | None:
    """The best checkpoint directory of the latest local-mode run (None if there was none)."""
    best = _LOCAL_LAST.get("best")
    return Path(best) if best is not None and Path(best).exists() else None


__all__ = ["keep_local", "local_best_checkpoint", "select_local_best"]
