"""Training and probing reads that scale out: on a two-node Ray cluster (head + one `ray start` node, the
cluster tests' RayCluster), two Ray Train workers, one per node, read disjoint shards of one cohort on storage
both nodes mount, through the platform's data path (tests/shard_reads.py). Each reads through a memory map
(no copy of the cache per node), their shards together are what one worker reads alone, and every sample
read on either node has the bytes a single process reads from the cohort."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from stence.config import Config
from stence.data.cohort_io import Cohort
from stence.data.datasets import EcgDataset
from tests.cluster_fixtures import RayCluster, make_root, tail
from tests.shard_reads import TASK

REPO = Path(__file__).resolve().parents[1]


def _read(cluster: RayCluster, cohort: Path, workers: int, out: Path, storage: Path) -> list[dict]:
    log = out.parent / f"shards-{workers}.log"
    env = {**cluster.client_env(), "RAY_ADDRESS": cluster.address}
    with open(log, "w") as f:
        r = subprocess.run([sys.executable, str(REPO / "tests" / "shard_reads.py"), "--cohort", str(cohort),
                            "--workers", str(workers), "--out", str(out), "--storage", str(storage)],
                           env=env, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, timeout=600)  # fmt: skip
    assert r.returncode == 0, tail(log, 60)
    return [json.loads(p.read_text()) for p in sorted(out.glob("rank*.json"))]


@pytest.mark.slow
@pytest.mark.ray
def test_two_nodes_read_disjoint_shards_of_the_shared_cohort(tiny_cohort: Path, two_node_cluster: RayCluster) -> None:
    cluster = two_node_cluster  # head + node2, one `shard` resource each (conftest, shared with test_ingest_ray)
    root = make_root()
    shared = root / "shared"  # what NFS is on a real cluster: one path every node sees
    shutil.copytree(tiny_cohort, shared / "cohort")
    try:
        nodes = {n["node_id"] for n in cluster.alive().values()}
        assert len(nodes) == 2
        two = _read(cluster, shared / "cohort", 2, root / "two", shared / "ray")
        one = _read(cluster, shared / "cohort", 1, root / "one", shared / "ray")
    finally:
        shutil.rmtree(root, ignore_errors=True)

    assert len(two) == 2 and {w["node"] for w in two} == nodes  # one worker on each node
    assert all(w["memmap"] for w in two + one)  # the cache is mapped, never copied into a worker
    for split in ("train", "val"):
        shards = [set(w[split]) for w in two]
        assert shards[0] and shards[1] and not shards[0] & shards[1], split  # both read, nothing twice
        alone = set(one[0][split])
        assert shards[0] | shards[1] <= alone and len(alone - (shards[0] | shards[1])) <= 1, split  # drop_last
    # the bytes read on either node are the cohort's, as one process here reads them from the original
    local = {s: EcgDataset(Cohort(tiny_cohort), s, Config().data, TASK, train=False) for s in ("train", "val")}
    for w in two:
        for split in ("train", "val"):
            for i, checksum in w[split].items():
                assert checksum == pytest.approx(float(local[split][int(i)]["ecg"].double().sum()), rel=1e-6)
