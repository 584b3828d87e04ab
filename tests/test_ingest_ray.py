"""Ingest that scales out on Ray: the decode jobs run with Ray Data on a Ray cluster's nodes
(stence/data/ray_decode.py) and give the same cohort as the local process pool on the same export: same
fingerprint, same quarantine, same site map. A job that kills its worker is quarantined while the rest
completes; a node that does not see the shared storage stops the ingest. On a two-node cluster (head + one
`ray start` node, the cluster tests' RayCluster) `stence ingest` with RAY_ADDRESS set decodes on both nodes.

Run with: .venv/bin/pytest -q tests/test_ingest_ray.py
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest

from stence.config import Config
from stence.data.ingest import ingest, read_site_map
from stence.data.synth import SynthConfig, write_cohort
from stence.pipelines.ingest import decode_engine
from tests.cluster_fixtures import make_root, tail

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def export_and_local(tmp_path_factory) -> tuple[Path, Path]:
    """A small synthetic export with corrupt files (so the quarantine is not empty), and its cohort built
    by the local process pool (the reference every Ray-built cohort is compared with)."""
    root = tmp_path_factory.mktemp("ray-ingest")
    raw = root / "raw"
    write_cohort(raw, SynthConfig.preset("tiny", patients=8, corrupt_fraction=0.15, seed=7))
    ingest(raw, root / "local", Config(), processes=2, engine="local")
    return raw, root / "local"


def _meta(cohort: Path) -> dict:
    return json.loads((cohort / "cohort.json").read_text())


def _same_cohort(a: Path, b: Path) -> None:
    """Same fingerprint, counts, quarantine reasons and site-map rows."""
    assert _meta(a)["fingerprint"] == _meta(b)["fingerprint"]
    assert _meta(a)["counts"] == _meta(b)["counts"]
    qa, qb = (pd.read_parquet(c / "quarantine.parquet") for c in (a, b))
    assert len(qa) > 0 and Counter(qa["reason"]) == Counter(qb["reason"])
    sa, sb = (read_site_map(Path(f"{c}.site-identifiers")).sort_values(["file", "path", "status"])
              .reset_index(drop=True) for c in (a, b))
    pd.testing.assert_frame_equal(sa, sb)


def test_the_engine_is_ray_when_asked_or_when_ray_address_names_a_cluster(monkeypatch):
    from stence.train import driver

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert decode_engine() == "local" and decode_engine(ray=True) == "ray"
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    assert decode_engine() == "ray"
    assert decode_engine(processes=2) == "local"  # an explicit local process count keeps it on this machine
    monkeypatch.setattr(driver, "_OWN_ADDRESS", "10.0.0.1:6379")  # only this process's own local instance
    assert decode_engine() == "local" and decode_engine(ray=True) == "ray"


@pytest.mark.slow
@pytest.mark.ray
def test_ray_engine_gives_the_local_pools_cohort(export_and_local, ray_session, tmp_path, capsys):
    raw, local = export_and_local
    out = tmp_path / "on-ray"
    report = ingest(raw, out, Config(), engine="ray")
    printed = capsys.readouterr().out
    assert re.search(r"decode: Ray Data on a cluster of 1 node\(s\), \d+ CPU\(s\)", printed), printed
    assert report.fingerprint == _meta(local)["fingerprint"]
    _same_cohort(local, out)
    assert not (out / "records").exists() and not (out / ".shared-storage-probe").exists()


@pytest.mark.slow
@pytest.mark.ray
def test_a_job_that_kills_its_worker_is_quarantined_and_the_rest_completes(ray_session):
    from stence.data.ray_decode import RayRunInfo, run_jobs_ray
    from tests.pool_jobs import kill_on_three

    info = RayRunInfo()
    out = run_jobs_ray(kill_on_three, list(range(8)), "test", on_death=lambda j: {"died": j}, progress=False,
                       info=info)
    assert out == [{"x": i} if i != 3 else {"died": 3} for i in range(8)]
    assert info.died == 1 and sum(info.jobs_by_node.values()) == 7


@pytest.mark.slow
@pytest.mark.ray
def test_an_exception_in_a_job_and_unshared_storage_stop_the_batch(ray_session, tmp_path):
    """What must stop an ingest stops it: an exception a decode function raises (a full disk) arrives as
    itself, errno and all; a node that does not read the driver's token file raises SharedStorageError."""
    from stence.data.ray_decode import SharedStorageError, run_jobs_ray

    with pytest.raises(FileNotFoundError) as e:
        run_jobs_ray(os.stat, ["/", str(tmp_path / "missing")], "test", lambda j: {}, progress=False)
    assert e.value.errno == errno.ENOENT
    probe = tmp_path / "probe"
    probe.write_text("the driver's token")
    with pytest.raises(SharedStorageError, match="storage every node mounts"):
        run_jobs_ray(str, [1, 2], "test", lambda j: {}, progress=False, must_see={str(probe): "another token"})


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.timeout(1200)
def test_stence_ingest_with_ray_address_decodes_on_both_nodes_of_a_cluster(export_and_local, two_node_cluster):
    """`stence ingest` in a fresh process with RAY_ADDRESS set (no --ray) and token auth: decode tasks run
    on the head and on node2 (node ids recorded by the tasks themselves), and the cohort is the local
    pool's. The cluster (head + node2, 1 CPU each) is conftest's, shared with test_sharded_reads."""
    raw, local = export_and_local
    cluster = two_node_cluster
    root = make_root()
    shared = root / "shared"  # what NFS is on a real cluster: one path every node sees
    shutil.copytree(raw, shared / "raw", symlinks=True)
    env = {**cluster.client_env(), "RAY_ADDRESS": cluster.address}
    r = subprocess.run([sys.executable, "-m", "stence.cli", "ingest", str(shared / "raw"), "--out",
                        str(shared / "cohort")], env=env, cwd=REPO, capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, f"{r.stdout[-3000:]}\n{r.stderr[-5000:]}\n{tail(cluster.log('node2'))}"
    _same_cohort(local, shared / "cohort")
    assert "decode: Ray Data on a cluster of 2 node(s), 2 CPU(s)" in r.stdout, r.stdout
    assert "decode: jobs ran on 2 of 2 node(s)" in r.stdout, r.stdout
    shutil.rmtree(root, ignore_errors=True)
