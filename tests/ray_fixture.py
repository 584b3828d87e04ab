"""Session fixtures for the Ray tests: one local Ray instance and one MLflow SQLite database.

Starting Ray and creating an MLflow database each cost many seconds on a 2-core machine, so every test
of the session shares them (tests tell their runs apart by experiment, name and tags).
`ray_session` is registered in conftest; test modules wrap `shared_mlflow_db` in a fixture.
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
