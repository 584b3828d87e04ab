"""MLflow runs with explicit run ids: one writer (rank 0), a null tracker everywhere else.

No fluent `mlflow.start_run()` global state: the driver creates runs with `start_run` and hands their
ids to the workers, which log through `open_tracker(uri, run_id, rank)`. Nothing is read or opened at
import time. Where runs go (URIs, spools) is stence/tracking/client.py.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import yaml

from stence.config import Config, config_hash, flatten, to_dict
from stence.tracking.client import artifact_location, default_spool, resolve_tracking_uri, tracking_client
from stence.tracking.owner import driver_identity
from stence.tracking.spool import CLOSE_WAIT_S, DEADLINE_S, new_record, pending_records, replay_command
from stence.tracking.tags import CONFIG_HASH_TAG, DRIVER_TAG, PARENT_TAG, SPOOL_TAG
from stence.tracking.writer import writer_for

logger = logging.getLogger("stence.tracking")

_MAX_BATCH = 100  # MLflow accepts at most 100 params or tags per log_batch
_MAX_PARAM_LEN = 6000


def _experiment_id(client: Any, uri: str, name: str) -> str:
    """Get or create the experiment; a concurrent creator winning the race is fine."""
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    try:
        return client.create_experiment(name, artifact_location=artifact_location(uri, name))
    except Exception:  # another process created it between the two calls
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def _str_value(v: Any) -> str:
    s = json.dumps(v, default=str) if isinstance(v, (list, tuple, dict)) else str(v)
    return s[:_MAX_PARAM_LEN]


def _log_params(client: Any, run_id: str, params: dict[str, Any]) -> None:
    from mlflow.entities import Param  # mlflow (~1.5 s to import): only when a run is tracked

    items = [Param(str(k), _str_value(v)) for k, v in params.items()]
    for i in range(0, len(items), _MAX_BATCH):
        client.log_batch(run_id, params=items[i : i + _MAX_BATCH])


def start_run(
    cfg: Config,
    run_name: str,
    parent_run_id: str | None = None,
    tags: dict[str, Any] | None = None,
    params: dict[str, Any] | None = None,
    spool: str | os.PathLike | None = None,
) -> str:
    """Create a RUNNING run (nested under `parent_run_id` if given); log the flattened resolved config
    as params (plus `params`) and the config YAML as the artifact `config.yaml`. Returns the run id.

    The run records its driver (this process, unless `tags` name another in `stence.driver`) for
    `stence runs repair`, and the spool file its trackers buffer to (`spool`) for replays. Creating a run
    needs the store: unlike the Tracker calls this fails (after MLflow's own retries) when it is down."""
    uri = resolve_tracking_uri(cfg)
    client = tracking_client(uri)
    exp_id = _experiment_id(client, uri, cfg.tracking.experiment)
    all_tags = {CONFIG_HASH_TAG: config_hash(cfg), DRIVER_TAG: driver_identity(), **(tags or {})}
    if spool:
        all_tags[SPOOL_TAG] = str(spool)
    if parent_run_id:
        all_tags[PARENT_TAG] = parent_run_id
    run = client.create_run(exp_id, run_name=run_name, tags={k: str(v) for k, v in all_tags.items()})
    run_id = run.info.run_id
    _log_params(client, run_id, {**flatten(to_dict(cfg)), **(params or {})})
    client.log_text(run_id, yaml.safe_dump(to_dict(cfg), sort_keys=False), "config.yaml")
    return run_id


def find_run(cfg: Config, tags: dict[str, Any]) -> str | None:
    """Id of the newest run of the config's experiment carrying all `tags` (e.g. a trial's child run
    found by its trial-id tag when a sweep resumes), or None."""
    return find_run_by(resolve_tracking_uri(cfg), cfg.tracking.experiment, tags)


def _quote(value: str) -> str:
    """A filter-string literal (MLflow has no escapes: pick the quote the value does not contain)."""
    if "'" not in value:
        return f"'{value}'"
    if '"' not in value:
        return f'"{value}"'
    raise ValueError(f"tag value {value!r} contains both quote characters; MLflow cannot filter on it")


def search_runs_by(uri: str, experiment: str, tags: dict[str, Any], status: str | None = None) -> list[Any]:
    """Runs of `experiment` carrying all `tags` (and `status`, if given), newest first."""
    client = tracking_client(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    clauses = [f"tags.`{k}` = {_quote(str(v))}" for k, v in tags.items()]
    if status:
        clauses.append(f"attributes.status = '{status}'")
    return list(
        client.search_runs(
            [exp.experiment_id], filter_string=" and ".join(clauses), order_by=["start_time DESC"]
        )
    )


def find_run_by(uri: str, experiment: str, tags: dict[str, Any]) -> str | None:
    """`find_run` with an explicit URI and experiment name (for code without a Config)."""
    runs = search_runs_by(uri, experiment, tags)
    return runs[0].info.run_id if runs else None


def run_status(uri: str, run_id: str) -> str:
    """RUNNING / FINISHED / FAILED / KILLED."""
    return tracking_client(uri).get_run(run_id).info.status


class Tracker:
    """Logs to one MLflow run by id (rank 0 only; see `open_tracker`) through the run's spool.

    Every call is appended to the spool file first and replayed to the store by a background thread (see
    spool.py, replay.py and writer.py). While the store answers, a call returns once applied (at most
    `deadline_s`), and errors the store gives for good (a changed param, a deleted run) are raised as before.
    While it does not (server down, SQLite locked), calls return at once: their lines wait in the spool, one
    warning says tracking is degraded, and each later call retries. `close()` (and `end()`) wait a bounded time for the
    last replay and name the replay command for anything left.
    """

    def __init__(self, uri: str, run_id: str, spool: str | os.PathLike | None = None,
                 deadline_s: float = DEADLINE_S):
        self.uri = uri
        self.run_id = run_id
        self.spool = Path(spool) if spool else default_spool(uri)
        self.deadline_s = deadline_s
        self._writer = writer_for(self.spool)
        self._dedupe = False  # after a restore: skip the (key, step) pairs the run already has

    def _submit(self, op: str, **fields: Any) -> None:
        rec = new_record(self.uri, self.run_id, op, **fields)
        self._writer.submit(rec)
        if self._writer.degraded:  # the replay retries in the background: never hold training up
            return
        if self._writer.wait_for(rec["id"], self.deadline_s):
            err = self._writer.errors.pop(rec["id"], None)
            if err is not None:
                raise err

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        self._submit("metrics", metrics=[[str(k), float(v), now, int(step)] for k, v in metrics.items()],
                     dedupe=self._dedupe)

    def log_params(self, params: dict[str, Any]) -> None:
        self._submit("params", params={str(k): _str_value(v) for k, v in params.items()})

    def set_tags(self, tags: dict[str, Any]) -> None:
        self._submit("tags", tags={str(k): str(v) for k, v in tags.items()})

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        self._submit("artifact", path=str(Path(path).resolve()), artifact_path=artifact_path)

    def log_dict(self, obj: dict[str, Any], name: str) -> None:
        self._submit("dict", obj=obj, name=name)

    def end(self, status: str = "FINISHED", if_running: bool = False) -> None:
        """Terminate the run (only if still RUNNING with `if_running`), then `close()`."""
        self._submit("status", status=status, end_time=int(time.time() * 1000), if_running=if_running)
        self.close()

    def reopen(self) -> None:
        """Mark a KILLED/FINISHED run RUNNING again (a resumed sweep or trial keeps logging into it)."""
        self._submit("reopen")

    def stamp(self, metrics: dict[str, Any], step: int) -> dict[str, Any]:
        """What a checkpoint keeps of its epoch's tracking (see `refill`)."""
        return {"run_id": self.run_id, "step": int(step),
                "metrics": {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}}

    def refill(self, stamp: dict[str, Any] | None) -> None:
        """After a restore into the same run: log the restored checkpoint's metrics (they are logged after
        their checkpoint is committed, so a crash in between would lose them), and from now on skip every
        (key, step) the run already has (an epoch trained again after a restore is not logged twice)."""
        if stamp and stamp.get("run_id") == self.run_id:
            self._dedupe = True
            if stamp.get("metrics"):
                self.log_metrics(stamp["metrics"], step=int(stamp["step"]))

    def flush(self, wait_s: float = CLOSE_WAIT_S) -> bool:
        """Replay what is pending, waiting at most `wait_s`; True when nothing is left."""
        deadline = time.monotonic() + wait_s
        for _ in range(2):  # the running replay may have started before the last lines were appended
            self._writer.kick()
            self._writer.wait_idle(max(0.0, deadline - time.monotonic()))
            if not pending_records(self._writer.path):
                return True
            if self._writer.degraded or time.monotonic() >= deadline:
                break
        return False

    def close(self, wait_s: float = CLOSE_WAIT_S) -> int:
        """Flush (bounded); warn with the replay command if items remain. Returns how many remain."""
        if self.flush(wait_s):
            return 0
        spool = self._writer.path
        n = len(pending_records(spool))
        logger.warning("tracking degraded: %d items (metrics, params, tags or the final status) for MLflow run "
                       "%s are buffered in %s; when the tracking store is back, run: %s", n, self.run_id,
                       spool, replay_command(spool))
        return n


class NullTracker:
    """Same API as Tracker; does nothing (ranks != 0, tracking disabled)."""

    uri = ""
    run_id = None
    spool = None

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        pass

    def log_params(self, params: dict[str, Any]) -> None:
        pass

    def set_tags(self, tags: dict[str, Any]) -> None:
        pass

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        pass

    def log_dict(self, obj: dict[str, Any], name: str) -> None:
        pass

    def end(self, status: str = "FINISHED", if_running: bool = False) -> None:
        pass

    def reopen(self) -> None:
        pass

    def stamp(self, metrics: dict[str, Any], step: int) -> None:
        return None

    def refill(self, stamp: dict[str, Any] | None) -> None:
        pass

    def flush(self, wait_s: float = CLOSE_WAIT_S) -> bool:
        return True

    def close(self, wait_s: float = CLOSE_WAIT_S) -> int:
        return 0


def open_tracker(uri: str | None, run_id: str | None, rank: int,
                 spool: str | os.PathLike | None = None) -> Tracker | NullTracker:
    """A Tracker on rank 0 when a run id is given, a NullTracker otherwise."""
    if rank != 0 or not run_id or not uri:
        return NullTracker()
    return Tracker(uri, run_id, spool=spool)


LOOP_URI_KEY = "mlflow_uri"  # keys of the train_loop_config entries that carry the tracking target
LOOP_RUN_KEY = "mlflow_run_id"
LOOP_SPOOL_KEY = "mlflow_spool"


def loop_tracking(uri: str | None, run_id: str | None, spool: str | os.PathLike | None = None) -> dict[str, Any]:
    """Entries for `fit(..., loop_config=...)` telling the per-worker loop where to log (and spool)."""
    return {LOOP_URI_KEY: uri, LOOP_RUN_KEY: run_id, LOOP_SPOOL_KEY: str(spool) if spool else None}


def tracker_for_loop(config: dict[str, Any], rank: int) -> Tracker | NullTracker:
    """The tracker a per-worker loop logs through, from the entries `loop_tracking` added."""
    return open_tracker(config.get(LOOP_URI_KEY), config.get(LOOP_RUN_KEY), rank, config.get(LOOP_SPOOL_KEY))


__all__ = [
    "LOOP_RUN_KEY",
    "LOOP_SPOOL_KEY",
    "LOOP_URI_KEY",
    "NullTracker",
    "Tracker",
    "find_run",
    "find_run_by",
    "loop_tracking",
    "open_tracker",
    "run_status",
    "search_runs_by",
    "start_run",
    "tracker_for_loop",
]
