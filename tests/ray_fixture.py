"""Session fixtures for the Ray tests: one local Ray instance and one MLflow SQLite database.

Starting Ray and creating an MLflow database each cost many seconds on a 2-core machine, so every test
of the session shares them (tests tell their runs apart by experiment, name and tags).
`ray_session` is registered in conftest; test modules wrap `shared_mlflow_db` in a fixture.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest


@pytest.fixture(scope="session")
def ray_session() -> Iterator[None]:
    """A local Ray instance (4 logical CPUs: two 1-CPU workers plus a Tune trial driver fit on 2 cores)."""
    import ray

    from stence.train.driver import ensure_ray, shutdown_ray

    started = not ray.is_initialized()
    ensure_ray(num_cpus=4)
    yield
    if started:
        shutdown_ray()


_SHARED: dict[str, str] = {}


def shared_mlflow_db(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Absolute sqlite URI of one database per test session (created on first use; tables made now).

    Test modules wrap it in their own `mlflow_db` fixture."""
    if "mlflow_db" not in _SHARED:
        import mlflow

        path = tmp_path_factory.getbasetemp() / "mlflow" / "mlflow.db"
        path.parent.mkdir(parents=True, exist_ok=True)
        uri = f"sqlite:///{path}"
        mlflow.MlflowClient(tracking_uri=uri).search_experiments()  # creates the tables
        _SHARED["mlflow_db"] = uri
    return _SHARED["mlflow_db"]


# Ray settings of the test session (conftest puts them in os.environ before any Ray instance starts; tests that
# start a process with a cleaned environment pass them on with `ray_test_settings()`).
# RAY_TRAIN_HEALTH_CHECK_INTERVAL_S: how often a Train controller polls its workers (Ray's default: 2 s). A worker's
# report waits in a queue of one until that poll takes it, and the end of a run is seen at the next poll, so on the
# toy and tiny runs of the tests every epoch and every run end waited up to 2 s for it. A poll that a busy worker
# does not answer in time is no error (Ray gives a worker RAY_TRAIN_WORKER_HEALTH_CHECK_TIMEOUT_S, 10 min).
RAY_TEST_SETTINGS = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}


def ray_test_settings() -> dict[str, str]:
    """The session's values of RAY_TEST_SETTINGS (a value set by the caller's environment wins)."""
    return {k: os.environ.get(k, v) for k, v in RAY_TEST_SETTINGS.items()}
