"""The background writer of a spool file, one per file and process, shared by every Tracker writing to it:
appends each record, then replays the pending ones (replay.py) from a background thread, one at a time,
so a caller waits for its record only while the store is healthy.
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
import time
from pathlib import Path

from stence.tracking.replay import ReplayStats, bounded_http, replay_pending
from stence.tracking.spool import (
    FLUSH_LOCK_WAIT_S,
    append_records,
    compact,
    pending_records,
    replay_command,
    replay_lock,
)

logger = logging.getLogger("stence.tracking")


class SpoolWriter:
    """Appends records to one spool file and replays them from a background thread (one at a time)."""

    def __init__(self, path: Path):
        self.path = path
        self.cond = threading.Condition()  # guards running/finished; appends happen under it too
        self.running = False  # a replay thread is working through the file
        self.finished: set[str] = set()  # ids applied or dropped by this process's replays
        self.degraded = ""  # the error that made tracking degraded ("" while healthy)
        self.errors: dict[str, BaseException] = {}  # permanent failures by record id, for waiting callers
        self.known: dict[tuple[str, str, str], set[int]] = {}  # steps the store has, per (uri, run, key)
        self.first_try: set[str] = set()  # ids submitted here and not tried yet

    def _start(self) -> None:
        self.running = True
        threading.Thread(target=self._run, name="stence-tracking", daemon=True).start()

    def submit(self, record: dict) -> None:
        """Append `record` and make sure a replay runs. A spool that cannot be written (a read-only folder)
        moves to the temporary folder, with a warning: tracking must not fail training either."""
        with self.cond:
            try:
                append_records(self.path, [record])
            except OSError as e:
                moved = Path(tempfile.gettempdir()) / "stence-spool" / f"{os.getpid()}-{self.path.parent.name}"
                logger.warning("tracking: cannot write the spool %s (%s); buffering to %s instead", self.path, e,
                               moved / self.path.name)
                self.path = moved / self.path.name
                append_records(self.path, [record])
            self.first_try.add(record["id"])
            if not self.running:
                self._start()

    def kick(self) -> None:
        """Start a replay of whatever is pending (written by this process or another), unless one runs."""
        with self.cond:
            if not self.running and pending_records(self.path):
                self._start()

    def wait_for(self, record_id: str, timeout_s: float) -> bool:
        """Wait until the replay has applied (or dropped) `record_id`; False if it failed or timed out."""
        deadline = time.monotonic() + timeout_s
        with self.cond:
            while record_id not in self.finished:
                left = deadline - time.monotonic()
                if not self.running:
                    return False
                if left <= 0:
                    break
                self.cond.wait(left)
            else:
                self.finished.discard(record_id)
                return True
        self._degrade(f"the tracking store did not answer within {timeout_s:.0f} s")
        return False

    def wait_idle(self, timeout_s: float) -> bool:
        """Wait until no replay runs; False on timeout."""
        deadline = time.monotonic() + timeout_s
        with self.cond:
            while self.running:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self.cond.wait(left)
        return True

    def _done(self, ids: list[str]) -> None:
        with self.cond:
            self.finished.update(ids)
            self.cond.notify_all()

    def _run(self) -> None:
        stats = ReplayStats()
        try:
            with replay_lock(self.path, FLUSH_LOCK_WAIT_S) as held:
                if not held:
                    return  # another process replays this file: it takes our lines too
                with bounded_http():
                    while True:
                        if not replay_pending(self.path, self.known, stats, self.errors, self._done,
                                              self.first_try):
                            self._degrade(stats.error)
                            return
                        with self.cond:  # stop only if nothing was appended meanwhile (atomic with submit)
                            if not pending_records(self.path):
                                compact(self.path)
                                self.running = False
                                self.cond.notify_all()
                                break
            if self.degraded:
                logger.warning("tracking recovered: replayed %d buffered items from %s", stats.applied, self.path)
                self.degraded = ""
        except Exception as e:  # noqa: BLE001 - a replay thread must never take training down
            self._degrade(f"{type(e).__name__}: {e}")
        finally:
            with self.cond:
                self.running = False
                self.cond.notify_all()

    def _degrade(self, error: str) -> None:
        first = not self.degraded
        self.degraded = error or "unknown error"
        if first:
            n = len(pending_records(self.path))
            logger.warning("tracking degraded: %s; buffered %d items to %s (training goes on; retried at the "
                           "next epoch; if they remain, run: %s)", self.degraded, n, self.path,
                           replay_command(self.path))


_WRITERS: dict[Path, SpoolWriter] = {}
_WRITERS_LOCK = threading.Lock()


def writer_for(path: Path | str) -> SpoolWriter:
    """The process's writer of a spool file (shared by every tracker writing to it)."""
    p = Path(path).resolve()
    with _WRITERS_LOCK:
        if p not in _WRITERS:
            _WRITERS[p] = SpoolWriter(p)
        return _WRITERS[p]


__all__ = ["SpoolWriter", "writer_for"]
