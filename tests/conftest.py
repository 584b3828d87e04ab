"""Shared fixtures: the real sample files in ../shared/data and one Ray instance per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.ray_fixture import ray_session  # noqa: F401

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("STENCE_SALT", "test-site-secret")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("STENCE_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Real WFDB/DICOM sample files; skip (with the reason) on a clone without ../shared."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real sample files not found at {SHARED_DATA} (a fresh clone has no ../shared)")
    return SHARED_DATA
