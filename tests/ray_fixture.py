"""Session fixtures for the Ray tests: one local Ray instance and one MLflow SQLite database.

Starting Ray and creating an MLflow database each cost many seconds on a 2-core machine, so every test
of the session shares them (tests tell their runs apart by experiment, name and tags).
Import `mlflow_db` explicitly in the test modules that use it; `ray_session` is registered in conftest.
"""

from __future__ import annotations

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


@pytest.fixture(scope="session")
def mlflow_db(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Absolute sqlite URI of a database created once for the session."""
    import mlflow

    path = tmp_path_factory.mktemp("mlflow") / "mlflow.db"
    uri = f"sqlite:///{path}"
    mlflow.MlflowClient(tracking_uri=uri).search_experiments()  # creates the tables now
    return uri
