"""Stenosis labels: segment degrees -> the method's 11 binary targets, and threshold tasks."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from stence.config import THRESHOLD_TASKS

SEGMENTS = tuple(range(1, 17))  # AHA/SYNTAX numbering
RCA_SEGMENTS = (1, 2, 3, 4)
MAJOR_SEGMENTS = (1, 2, 3, 5, 6, 7, 11, 13)
RCA_MAJOR = (1, 2, 3)
LCA_MAJOR = (5, 6, 7, 11, 13)
TARGET_NAMES = ("patient", "rca", "lca") + tuple(f"seg{s}" for s in MAJOR_SEGMENTS)
SEVERE = 70.0  # "max degree >= 70 %"


def targets_from_segments(degrees: Mapping[int, float]) -> np.ndarray:
    """Segment -> degree % (missing segments count as 0) -> (11,) float32 targets in TARGET_NAMES order."""
    d = {int(k): float(v) for k, v in degrees.items()}

    def severe(segs: tuple[int, ...]) -> float:
        return float(max((d.get(s, 0.0) for s in segs), default=0.0) >= SEVERE)

    out = [severe(MAJOR_SEGMENTS), severe(RCA_MAJOR), severe(LCA_MAJOR)]
    out += [severe((s,)) for s in MAJOR_SEGMENTS]
    return np.asarray(out, dtype=np.float32)


def max_degree(degrees: Mapping[int, float]) -> float:
    """Patient-level downstream label: the maximum degree over all annotated segments."""
    return float(max((float(v) for v in degrees.values()), default=0.0))


def parse_task(task: str) -> tuple[float, float]:
    """Task name -> (a, b). Known names (THRESHOLD_TASKS), "a_b" for a custom pair, or "s" for one threshold."""
    if task in THRESHOLD_TASKS:
        return THRESHOLD_TASKS[task]
    parts = task.split("_")
    try:
        if len(parts) == 2:
            a, b = float(parts[0]), float(parts[1])
        elif len(parts) == 1:
            s = float(parts[0])
            a, b = s - 1e-3, s
        else:
            raise ValueError
    except ValueError as e:
        raise ValueError(
            f"unknown task {task!r}: use one of {sorted(THRESHOLD_TASKS)}, 'a_b' (e.g. '50_99') or one threshold 's'"
        ) from e
    if not a < b:
        raise ValueError(f"task {task!r}: need a < b")
    return a, b


def threshold_labels(max_stenosis: np.ndarray, task: str) -> tuple[np.ndarray, np.ndarray]:
    """Return (keep mask, binary labels of kept rows): label <= a negative, >= b positive, others dropped."""
    a, b = parse_task(task)
    y = np.asarray(max_stenosis, dtype=np.float64)
    neg, pos = y <= a, y >= b
    keep = neg | pos
    return keep, pos[keep].astype(np.int64)
