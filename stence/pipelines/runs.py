"""`stence runs replay`: send what trackers buffered while the tracking store was down or locked (spool files)
to MLflow. (`stence runs repair` is the sweep's `stence.tune.trial_runs.repair_runs`: it needs Tune's view of
the trials.)"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from stence.tracking.replay import ReplayStats, replay
from stence.tracking.spool import SPOOL_NAME, pending_records


class NoSuchSpool(FileNotFoundError):
    """A path given to replay that is neither a spool file nor a folder."""


@dataclass
class Replayed:
    """Each spool file replayed (those with nothing pending are skipped) and its stats; what is still pending."""

    spools: list[tuple[Path, ReplayStats]] = field(default_factory=list)
    pending: int = 0


def spool_files(paths: Iterable[str | Path]) -> list[Path]:
    """The spool files `paths` name: a file as given, a folder as every spool file under it (sorted). A path
    that does not exist raises NoSuchSpool before anything is replayed."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            out += sorted(p.rglob(SPOOL_NAME))
        elif p.exists():
            out.append(p)
        else:
            raise NoSuchSpool(f"no such spool file or folder: {p}")
    return out


def replay_paths(paths: Iterable[str | Path],
                 report: Callable[[Path, ReplayStats], None] | None = None) -> Replayed:
    """Replay every spool file under `paths` that has records pending, in order; `report(spool, stats)` after
    each. Returns them and the number of records still pending (the store did not answer)."""
    done = Replayed()
    for spool in spool_files(paths):
        if not pending_records(spool):
            continue
        stats = replay(spool)
        done.spools.append((spool, stats))
        done.pending += stats.pending
        if report is not None:
            report(spool, stats)
    return done


__all__ = ["NoSuchSpool", "Replayed", "replay_paths", "spool_files"]
