"""Shared fixtures: the real sample files in ../shared/data and one Ray instance per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.ray_fixture import RAY_TEST_SETTINGS, ray_session  # noqa: F401

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
for _key, _value in RAY_TEST_SETTINGS.items():  # before any Ray instance starts: its processes inherit them
    os.environ.setdefault(_key, _value)
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


# ---------------------------------------------------------------------------------------------------
# one two-node Ray cluster for the tests that need one (tests/cluster_fixtures.py SharedTwoNodeCluster)

TWO_NODES = "two_node_cluster"
_TWO_NODES = None  # the SharedTwoNodeCluster, made on first use


@pytest.fixture
def two_node_cluster():
    """A running two-node cluster (head + node2, 1 CPU and one `shard` resource each, token auth), shared by the
    tests that use this fixture: they run one after the other and it is stopped after the last of them."""
    global _TWO_NODES
    from tests.cluster_fixtures import SharedTwoNodeCluster

    if _TWO_NODES is None:
        _TWO_NODES = SharedTwoNodeCluster()
    return _TWO_NODES.get()


def pytest_collection_modifyitems(config, items) -> None:
    """Run the tests using `two_node_cluster` one after the other, where the first of them runs."""
    users = [item for item in items if TWO_NODES in getattr(item, "fixturenames", ())]
    if len(users) < 2:
        return
    first = items.index(users[0])
    others = [item for item in items if TWO_NODES not in getattr(item, "fixturenames", ())]
    items[:] = others[:first] + users + others[first:]


@pytest.hookimpl(trylast=True)
def pytest_runtest_teardown(item, nextitem) -> None:
    """Stop the shared two-node cluster after the last test of a run of tests using it."""
    if _TWO_NODES is not None and TWO_NODES in getattr(item, "fixturenames", ()) and (
            nextitem is None or TWO_NODES not in getattr(nextitem, "fixturenames", ())):
        _TWO_NODES.stop()


def pytest_sessionfinish(session, exitstatus) -> None:
    if _TWO_NODES is not None:  # interrupted runs too
        _TWO_NODES.stop()
