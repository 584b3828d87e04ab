"""Where tracking goes: the project directory, the tracking URI, artifact and spool locations, and the
one MLflow client factory every module uses (runs and the model registry alike).

URIs are always absolute because Ray Tune and Ray Train change the working directory of trials and
workers: a relative path means the project directory, which inside a Tune trial is the original working
directory (`TUNE_ORIG_WORKING_DIR`), not the trial's. Nothing is read at import time.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from stence.config import Config
from stence.tracking.spool import SPOOL_NAME


def project_dir() -> Path:
    """The directory relative paths mean: the original cwd inside a Tune trial, else the cwd."""
    return Path(os.environ.get("TUNE_ORIG_WORKING_DIR") or os.getcwd())


def _absolute_sqlite(uri: str) -> str:
    """sqlite:///relative.db -> sqlite:////abs/relative.db (a relative file moves with the cwd)."""
    path = uri[len("sqlite:///") :]
    if path.startswith("/") or path == ":memory:" or not path:
        return uri
    return "sqlite:///" + str((project_dir() / path).resolve())


def resolve_tracking_uri(cfg: Config) -> str:
    """cfg.tracking.uri, else $MLFLOW_TRACKING_URI, else sqlite:////<project>/runs/mlflow.db."""
    uri = cfg.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI", "")
    if not uri:
        return "sqlite:///" + str((project_dir() / "runs" / "mlflow.db").resolve())
    if uri.startswith("sqlite:///"):
        return _absolute_sqlite(uri)
    if "://" not in uri:
        raise ValueError(
            f"tracking URI {uri!r} has no scheme: use sqlite:////abs/path/mlflow.db or http://host:5000 "
            "(MLflow 3 refuses a plain ./mlruns file store unless opted in)"
        )
    return uri


def uri_or_default(uri: str | None) -> str:
    """`uri`, else the tracking URI of the default config (for code given no Config: serving, the CLI)."""
    return uri or resolve_tracking_uri(Config())


def _sqlite_file(uri: str) -> Path:
    return Path(unquote(uri[len("sqlite:///") :].split("?", 1)[0]))  # urlparse would keep "//" in front


def artifact_location(uri: str, experiment: str) -> str | None:
    """Artifacts beside a SQLite database (<db dir>/mlartifacts/<experiment>); servers choose their own."""
    if not uri.startswith("sqlite:///"):
        return None
    return (_sqlite_file(uri).parent / "mlartifacts" / experiment).as_uri()


def default_spool(uri: str) -> Path:
    """Spool of a tracker given none: beside a SQLite database, else <project>/runs/."""
    if uri.startswith("sqlite:///"):
        db = _sqlite_file(uri)
        if db.is_absolute():
            return db.parent / SPOOL_NAME
    return project_dir() / "runs" / SPOOL_NAME


def run_spool(storage_path: str, run_name: str) -> Path:
    """The spool of a training run: in its own folder, <storage>/<run name>/ (the folder of its Ray Train
    checkpoints). Remote storage (s3://...) cannot be appended to: <project>/runs/spool/<run name>/ then."""
    if "://" in storage_path:
        return project_dir() / "runs" / "spool" / run_name / SPOOL_NAME
    return Path(storage_path) / run_name / SPOOL_NAME


_CLIENTS: dict[str, Any] = {}
_CLIENTS_LOCK = threading.Lock()


def tracking_client(uri: str | None = None) -> Any:
    """The `mlflow.MlflowClient` bound to `uri` (default: `uri_or_default`) for tracking and the model
    registry alike; one per URI and process, shared by threads (the spool replays among them)."""
    uri = uri_or_default(uri)
    with _CLIENTS_LOCK:
        if uri not in _CLIENTS:
            import mlflow  # mlflow (~1.5 s to import): only when a store is used

            _CLIENTS[uri] = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
        return _CLIENTS[uri]


@contextlib.contextmanager
def global_tracking_uri(uri: str) -> Iterator[None]:
    """Point MLflow's process-wide tracking URI at `uri` for the block, then restore it (and the
    MLFLOW_TRACKING_URI variable, which `mlflow.set_tracking_uri` also writes). Only for MLflow calls
    that take no client (`Model.log`) or resolve `models:/` URIs globally."""
    # mlflow (~1.5 s to import): only for the MLflow calls that need the global URI
    import mlflow
    from mlflow.tracking._tracking_service import utils as tracking_utils

    previous = getattr(tracking_utils, "_tracking_uri", None)
    env = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous)
        if env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = env


__all__ = [
    "artifact_location",
    "default_spool",
    "global_tracking_uri",
    "project_dir",
    "resolve_tracking_uri",
    "run_spool",
    "tracking_client",
    "uri_or_default",
]
