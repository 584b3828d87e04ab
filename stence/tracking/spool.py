"""A write-ahead spool between the trackers and MLflow: training never waits on a store that is down or locked.

Every tracker call is first appended as one JSON line to the run's spool file (in the run's own folder), then
a background thread replays the pending lines to the store and acknowledges them. A caller waits for its line
only while the store is healthy, and at most `DEADLINE_S`; when a replay fails (server down, SQLite locked),
the line stays in the file, one warning says tracking is degraded, and the next call (the next epoch) retries.
Whatever is left at the end is replayed later by `stence runs replay PATH` (or `stence runs repair`).

Lines (`ts` in ms; `id` unique per record):

    {"id", "ts", "uri", "run_id", "op": "metrics", "metrics": [[key, value, timestamp, step], ...], "dedupe": bool}
    ...                          "op": "params",  "params": {key: value}
    ...                          "op": "tags",    "tags": {key: value}
    ...                          "op": "status",  "status": "FINISHED", "end_time": ms, "if_running": bool
    ...                          "op": "reopen"
    ...                          "op": "artifact", "path": local file, "artifact_path": str | null
    ...                          "op": "dict",    "obj": {...}, "name": "summary.json"
    {"ack": [id, ...]}                   applied
    {"dropped": {id: "error"}}           refused by the store for good (bad value, deleted run): never retried

Replays are idempotent: a metric (key, step) the run already has is skipped when the line may have reached
the store before (it was tried already, or another process wrote it) or asks for it ("dedupe": true, set
after a restore), so a line applied just before a crash, or an epoch logged again after a restore, never
duplicates a step; params and tags are set again, and a status may be made conditional on the run still
RUNNING. The file is truncated once nothing is pending.
Appends and rewrites hold an flock on the file; a replay holds an flock on a hidden sibling, so two processes
(a Ray Train worker and its driver) never replay the same lines at once. This module is the file; the
replays are in replay.py, the background writer in writer.py.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

SPOOL_NAME = "mlflow_spool.jsonl"  # in the run's folder (<storage>/<run name>/) or the sweep's
DEADLINE_S = 10.0  # a caller waits at most this long for its call while the store is healthy
CLOSE_WAIT_S = 30.0  # end of a run: how long to wait for the last replay
FLUSH_LOCK_WAIT_S = 60.0  # a replay waits this long for another process's replay of the same file


def replay_command(path: Path | str) -> str:
    """The command that replays a spool file by hand."""
    return f"stence runs replay {path}"


# ---------------------------------------------------------------------------------------------------
# the file


@contextlib.contextmanager
def _flocked(path: Path, mode: str = "a+") -> Iterator[Any]:
    """The spool file opened and exclusively flocked (appends and rewrites are short)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, mode) as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield f
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _parse(lines: list[str]) -> tuple[list[dict], set[str]]:
    """(records in file order, ids acknowledged or dropped); a torn last line (a crash mid-write) is skipped."""
    records, done = [], set()
    for line in lines:
        try:
            item = json.loads(line)
        except ValueError:
            continue
        if "ack" in item:
            done.update(item["ack"])
        elif "dropped" in item:
            done.update(item["dropped"])
        elif "id" in item:
            records.append(item)
    return records, done


def append_records(path: Path, records: list[dict]) -> None:
    """Append records (or ack lines) to the spool file."""
    data = "".join(json.dumps(r, default=str) + "\n" for r in records)
    with _flocked(path) as f:
        f.write(data)
        f.flush()


def pending_records(path: Path) -> list[dict]:
    """Records of the spool file without an ack, in file order."""
    if not path.exists():
        return []
    with _flocked(path, "r") as f:
        records, done = _parse(f.read().splitlines())
    return [r for r in records if r["id"] not in done]


def compact(path: Path) -> int:
    """Rewrite the file with only its pending records (empty when none); returns how many remain."""
    if not path.exists():
        return 0
    with _flocked(path, "r+") as f:
        records, done = _parse(f.read().splitlines())
        keep = [r for r in records if r["id"] not in done]
        f.seek(0)
        f.truncate()
        f.write("".join(json.dumps(r, default=str) + "\n" for r in keep))
    return len(keep)


@contextlib.contextmanager
def replay_lock(path: Path, wait_s: float) -> Iterator[bool]:
    """Exclusive right to replay `path` (yields False if another replay held it for `wait_s`)."""
    lock = path.parent / f".{path.name}.replay.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a") as f:
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    yield False
                    return
                time.sleep(0.1)
        try:
            yield True
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def new_record(uri: str, run_id: str, op: str, **fields: Any) -> dict:
    return {"id": uuid.uuid4().hex, "ts": int(time.time() * 1000), "uri": uri, "run_id": run_id, "op": op,
            **fields}


__all__ = [
    "CLOSE_WAIT_S",
    "DEADLINE_S",
    "FLUSH_LOCK_WAIT_S",
    "SPOOL_NAME",
    "append_records",
    "compact",
    "new_record",
    "pending_records",
    "replay_command",
    "replay_lock",
]
