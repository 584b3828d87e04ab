"""Replaying spool files to MLflow (see spool.py for the format), by hand (`replay`, behind
`stence runs replay`) or from the background thread of a `SpoolWriter` (writer.py), the one per spool file
and process that every Tracker writing to that file shares.

A replay applies the pending records in order and acknowledges each. An error a retry cannot fix (the store
refused the value, the run was deleted) drops the record; any other (the store is unreachable, locked or
slow) stops the replay, leaving the rest pending for the next call: tracking is then "degraded", said once
in a warning, until a replay gets through.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from stence.tracking.client import tracking_client
from stence.tracking.spool import FLUSH_LOCK_WAIT_S, append_records, compact, pending_records, replay_lock
from stence.tracking.tags import HEARTBEAT_TAG

logger = logging.getLogger("stence.tracking")

# MLflow's HTTP client retries for minutes by default (7 retries, backoff factor 2, 120 s timeout). Replays
# use these bounds unless the user set the variables: a failed attempt costs seconds, and the next epoch retries.
HTTP_BOUNDS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
}
_MAX_METRICS = 1000  # MLflow's log_batch limits
_MAX_ITEMS = 100
# MLflow error codes that no retry will fix: such a line is dropped (and the waiting caller gets the error)
_PERMANENT = {
    "INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST", "RESOURCE_ALREADY_EXISTS", "BAD_REQUEST",
    "INVALID_STATE", "PERMISSION_DENIED", "UNAUTHENTICATED", "ENDPOINT_NOT_FOUND", "FEATURE_DISABLED",
}  # fmt: skip


# ---------------------------------------------------------------------------------------------------
# applying records to MLflow


_ENV_LOCK = threading.Lock()
_ENV_USERS = [0, {}]  # [replays running, values replaced]


@contextlib.contextmanager
def bounded_http() -> Iterator[None]:
    """MLflow's HTTP retry/timeout variables set to HTTP_BOUNDS (where the user has not set them) while a
    replay runs. They are process-wide: another thread's MLflow call meanwhile also gets the short bounds."""
    with _ENV_LOCK:
        if _ENV_USERS[0] == 0:
            _ENV_USERS[1] = {k: v for k, v in HTTP_BOUNDS.items() if k not in os.environ}
            os.environ.update(_ENV_USERS[1])
        _ENV_USERS[0] += 1
    try:
        yield
    finally:
        with _ENV_LOCK:
            _ENV_USERS[0] -= 1
            if _ENV_USERS[0] == 0:
                for k in _ENV_USERS[1]:
                    os.environ.pop(k, None)
                _ENV_USERS[1] = {}


def is_permanent(err: BaseException) -> bool:
    """True for errors a retry cannot fix (the store refused the call); False for an unreachable or busy store."""
    from mlflow.exceptions import MlflowException  # mlflow (~1.5 s to import): only once a call failed

    if isinstance(err, MlflowException):
        return err.error_code in _PERMANENT
    return isinstance(err, (FileNotFoundError, TypeError, ValueError, KeyError))


@dataclass
class ReplayStats:
    applied: int = 0  # records applied
    skipped_steps: int = 0  # metric values whose (key, step) the run already had
    dropped: dict[str, str] = field(default_factory=dict)  # record id -> why the store refused it
    pending: int = 0  # records still in the file
    error: str = ""  # the transient error that stopped the replay ("" when it got through)
    runs: set[str] = field(default_factory=set)


class _Applier:
    """Applies records to MLflow; remembers, per (uri, run, key), the steps the store already has."""

    def __init__(self, known: dict[tuple[str, str, str], set[int]], first_try: set[str]):
        self.known = known
        self.first_try = first_try  # ids appended by this process and never tried: nothing of them is stored

    def _steps(self, uri: str, run_id: str, key: str) -> set[int]:
        k = (uri, run_id, key)
        if k not in self.known:
            self.known[k] = {int(m.step) for m in tracking_client(uri).get_metric_history(run_id, key)}
        return self.known[k]

    def metrics(self, uri: str, run_id: str, records: list[dict], stats: ReplayStats) -> None:
        """One batch; a (key, step) the run has is skipped for every record that may have been stored before
        (tried already, written by another process) or that asks for it (logged again after a restore).
        A first try of a plain record is logged as is: a summary metric may be logged again on purpose."""
        from mlflow.entities import Metric, RunTag  # mlflow (~1.5 s): only when writing to a store

        batch, seen = [], set()
        for rec in records:
            check = rec.get("dedupe") or rec["id"] not in self.first_try
            self.first_try.discard(rec["id"])
            for key, value, ts, step in rec["metrics"]:
                if check and ((key, step) in seen or step in self._steps(uri, run_id, key)):
                    stats.skipped_steps += 1
                    continue
                seen.add((key, step))
                batch.append(Metric(key, float(value), int(ts), int(step)))
        if not batch:
            return
        client = tracking_client(uri)
        beat = [RunTag(HEARTBEAT_TAG, str(max(int(r["ts"]) for r in records) // 1000))]
        for i in range(0, len(batch), _MAX_METRICS):
            client.log_batch(run_id, metrics=batch[i : i + _MAX_METRICS], tags=beat if i == 0 else [])
            for m in batch[i : i + _MAX_METRICS]:
                if (uri, run_id, m.key) in self.known:
                    self.known[(uri, run_id, m.key)].add(m.step)

    def one(self, rec: dict) -> None:
        from mlflow.entities import Param, RunTag  # mlflow (~1.5 s): only when writing to a store

        client, run_id, op = tracking_client(rec["uri"]), rec["run_id"], rec["op"]
        if op == "params":
            items = [Param(k, v) for k, v in rec["params"].items()]
            for i in range(0, len(items), _MAX_ITEMS):
                client.log_batch(run_id, params=items[i : i + _MAX_ITEMS])
        elif op == "tags":
            items = [RunTag(k, v) for k, v in rec["tags"].items()]
            for i in range(0, len(items), _MAX_ITEMS):
                client.log_batch(run_id, tags=items[i : i + _MAX_ITEMS])
        elif op == "status":
            if rec.get("if_running") and client.get_run(run_id).info.status != "RUNNING":
                return
            client.set_terminated(run_id, rec["status"], end_time=rec.get("end_time"))
        elif op == "reopen":
            client.update_run(run_id, status="RUNNING")
        elif op == "artifact":
            if not Path(rec["path"]).exists():
                raise FileNotFoundError(f"artifact {rec['path']} no longer exists")
            client.log_artifact(run_id, rec["path"], rec.get("artifact_path"))
        elif op == "dict":
            client.log_dict(run_id, rec["obj"], rec["name"])
        else:
            raise ValueError(f"unknown spool op {op!r}")


def _groups(records: list[dict]) -> Iterator[list[dict]]:
    """Consecutive metric records of one run go in one batch; every other record alone."""
    group: list[dict] = []
    for rec in records:
        if rec["op"] == "metrics" and group and (rec["uri"], rec["run_id"]) == (group[0]["uri"], group[0]["run_id"]):
            group.append(rec)
            continue
        if group:
            yield group
        group = [rec]
        if rec["op"] != "metrics":
            yield group
            group = []
    if group:
        yield group


def replay_pending(path: Path, known: dict, stats: ReplayStats, errors: dict[str, BaseException],
                   on_done: Callable[[list[str]], None] | None = None, first_try: set[str] | None = None) -> bool:
    """Apply the pending records of `path` once, in order, acknowledging each; True if all got through.

    Stops at the first transient error (the rest stays pending); a permanent error drops its record (kept
    in `errors` for a caller waiting on it). `first_try`: ids never tried before (see `_Applier.metrics`;
    none for a replay by hand). The caller holds the replay lock."""
    applier = _Applier(known, first_try if first_try is not None else set())
    for group in _groups(pending_records(path)):
        ids = [r["id"] for r in group]
        try:
            if group[0]["op"] == "metrics":
                applier.metrics(group[0]["uri"], group[0]["run_id"], group, stats)
            else:
                applier.one(group[0])
        except Exception as e:  # noqa: BLE001 - sorted into permanent and transient right here
            if not is_permanent(e):
                stats.error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
                return False
            logger.error("tracking: the store refused %s for run %s, dropped: %s", group[0]["op"],
                         group[0]["run_id"], e)
            append_records(path, [{"dropped": {i: str(e)[:300] for i in ids}}])
            stats.dropped.update({i: str(e)[:300] for i in ids})
            errors.update(dict.fromkeys(ids, e))
        else:
            append_records(path, [{"ack": ids}])
            stats.applied += len(ids)
            stats.runs.add(group[0]["run_id"])
        if on_done is not None:
            on_done(ids)
    return True


def replay(path: Path | str, wait_s: float = FLUSH_LOCK_WAIT_S) -> ReplayStats:
    """Replay a spool file now, in this thread (`stence runs replay`); the file keeps what did not get through."""
    path = Path(path)
    stats = ReplayStats()
    with replay_lock(path, wait_s) as held:
        if not held:
            stats.error = "another process is replaying this spool"
        else:
            with bounded_http():
                replay_pending(path, {}, stats, {})
            compact(path)
    stats.pending = len(pending_records(path))
    return stats


__all__ = [
    "HTTP_BOUNDS",
    "ReplayStats",
    "bounded_http",
    "is_permanent",
    "replay",
    "replay_pending",
]
