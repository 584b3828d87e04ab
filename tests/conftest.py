"""Shared fixtures: the real sample files in ../shared/data and one Ray instance per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.ray_fixture import ray_session  # noqa: F401

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ["STENCE_SALT"] = "test-site-secret-7c1e"  # not the demo's public one (refused on real exports)

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("STENCE_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Real WFDB/DICOM sample files; skip (with the reason) on a clone without ../shared."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real sample files not found at {SHARED_DATA} (a fresh clone has no ../shared)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def tiny_cohort(tmp_path_factory) -> Path:
    """A small synthetic export, ingested once per test session (read-only for tests)."""
    from stence.config import Config
    from stence.data.ingest import ingest
    from stence.data.synth import SynthConfig, write_cohort

    root = tmp_path_factory.mktemp("tiny")
    write_cohort(root / "raw", SynthConfig.preset("tiny", patients=30, seed=1))
    ingest(root / "raw", root / "cohort", Config(), processes=2)
    return root / "cohort"


@pytest.fixture
def one_thread():
    """Small models on a shared machine: one torch thread avoids OpenMP spinning; restored afterwards."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def vendor(shared_data: Path) -> Path:
    """The real vendor ECG exports (GE MUSE, Philips, HL7 aECG) in ../shared/data/ecg_vendor."""
    d = shared_data / "ecg_vendor"
    if not d.is_dir():
        pytest.skip(f"vendor ECG samples not found at {d}")
    return d
