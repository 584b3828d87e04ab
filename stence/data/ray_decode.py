"""Per-file decode jobs on a Ray cluster with Ray Data: the same contract as pool.run_jobs, spread over
every node of the cluster.

Ray is imported inside the functions, never at module level: `stence --help` and every ingest on one
machine import stence.data.ingest, and importing Ray costs about half a second and pulls in its
dependencies (grpc, pyarrow's dataset layer) that the local pool never needs.

How a job runs: the jobs (pickled) become a Ray Data dataset of `{"i", "job"}` rows, one block per few
jobs; `Dataset.map` runs `fn` on each row in 1-CPU tasks that Ray Data schedules over the cluster's nodes
and streams back as they finish. Each row comes back as `{"i", "payload", "node"}`: the job index (so the
results go back into job order), the pickled result dict (results have nested and ragged fields that an
Arrow column would reshape), and the id of the node that ran it. A Python exception inside `fn` comes
back pickled in the payload and is raised on the driver as it was raised in the worker (a full disk stays
an OSError with its errno); the decode functions themselves already turn a bad file into a quarantine
dict, so this is only for what must stop the ingest.

How a dying worker is handled (SIGKILL, the OOM killer, a segfault in a native decoder): a map task whose
worker dies is retried once (`max_retries=1`, not Ray Data's default of retrying forever, which never
ends for a file that kills its worker each time). If it dies again the block is dropped rather than
failing the dataset (`max_errored_blocks=-1` on this dataset's own context), so every other block still
completes. The jobs of dropped blocks are then re-run each alone, as plain Ray tasks with
`max_retries=0`: a job whose worker dies alone (`WorkerCrashedError`, `OutOfMemoryError`, `NodeDiedError`)
yields `on_death(job)`, a quarantine row; the others return their results. As with the local pool, a
job is quarantined only after its worker died twice: once among its block, once alone.

Shared storage: the decode jobs read the export and write their arrays into the staging folder by path,
so both must be paths every node mounts (NFS, a cluster file system). Object storage (s3://, gs://) is not
supported yet. A node that does not see them would quarantine every file it gets as unreadable, a silently
smaller cohort; instead each task first checks `must_see` (file -> expected content, written by the driver
just before) and a node that misses one stops the ingest with SharedStorageError naming the path.
"""

from __future__ import annotations

import logging
import math
import os
import pickle
import warnings
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from tqdm import tqdm

MAX_JOBS_PER_BLOCK = 16  # a block is one task: small blocks balance the load and lose little when one dies
# Ray Data logs a dropped block with a long traceback; the suspects are re-run and reported here instead
_BLOCK_ERROR_LOGGER = "ray.data._internal.execution.streaming_executor_state"


class SharedStorageError(RuntimeError):
    """A Ray node does not see the export or the staging folder at the driver's path."""


@dataclass
class RayRunInfo:
    """What a Ray decode run used: the cluster it found and the nodes its jobs ran on."""

    cluster_nodes: int = 0
    cluster_cpus: float = 0.0
    jobs_by_node: Counter = field(default_factory=Counter)  # node id -> jobs decoded there
    isolated: int = 0  # jobs re-run alone after their block's worker died twice
    died: int = 0  # jobs whose worker died alone too (quarantined through on_death)


def connect() -> tuple[int, float]:
    """Connect if this process is not connected yet (ray.init(), which honours RAY_ADDRESS; the pipeline
    connects first with stence.train.driver.ensure_ray); (alive nodes, logical CPUs) of the cluster."""
    import ray  # lazily: see the module docstring

    if not ray.is_initialized():
        ray.init()
    return cluster_size()


def cluster_size() -> tuple[int, float]:
    """(alive nodes, logical CPUs) of the connected Ray cluster."""
    import ray  # lazily: see the module docstring

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    return len(nodes), float(ray.cluster_resources().get("CPU", 0.0))


_SEEN: set[tuple[str, str | None]] = set()  # shared-storage checks this worker process passed already


def _check_storage(must_see: Mapping[str, str | None]) -> None:
    for path, content in must_see.items():
        if (path, content) in _SEEN:
            continue
        try:
            ok = os.path.exists(path) if content is None else open(path, encoding="utf-8").read() == content
        except OSError:
            ok = False
        if not ok:
            import ray  # lazily: only inside a Ray worker

            node = ray.get_runtime_context().get_node_id()
            raise SharedStorageError(
                f"Ray node {node[:12]} does not see {path} as the driver wrote it: the export and the cohort "
                "folder must be on storage every node mounts at the same path (object storage is not supported "
                "yet)")
        _SEEN.add((path, content))


def _run_one(fn: Callable[[Any], dict], job_bytes: bytes, must_see: Mapping[str, str | None]) -> bytes:
    """The pickled ("ok", result) of fn(job), or ("err", exception) for the driver to raise."""
    try:
        _check_storage(must_see)
        out: tuple[str, Any] = ("ok", fn(pickle.loads(job_bytes)))
    except Exception as e:  # noqa: BLE001 - raised again on the driver, unchanged
        out = ("err", e)
    try:
        return pickle.dumps(out)
    except Exception as e:  # noqa: BLE001 - an exception that does not pickle is still reported
        return pickle.dumps(("err", RuntimeError(f"{type(out[1]).__name__}: {out[1]}; (unpicklable: {e})")))


class _Decode:
    """The Ray Data map function: one row `{"i", "job"}` -> `{"i", "payload", "node"}`."""

    def __init__(self, fn: Callable[[Any], dict], must_see: Mapping[str, str | None]) -> None:
        self.fn, self.must_see = fn, dict(must_see)

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        import ray  # lazily: runs in a Ray worker

        return {"i": int(row["i"]), "payload": _run_one(self.fn, row["job"], self.must_see),
                "node": ray.get_runtime_context().get_node_id()}


def _alone(fn: Callable[[Any], dict], job_bytes: bytes, must_see: Mapping[str, str | None]) -> tuple[bytes, str]:
    """A plain Ray task for one suspect job (see the module docstring)."""
    import ray  # lazily: runs in a Ray worker

    return _run_one(fn, job_bytes, must_see), ray.get_runtime_context().get_node_id()


def _unpack(payload: bytes) -> dict:
    status, value = pickle.loads(payload)
    if status == "err":
        raise value
    return value


def run_jobs_ray(
    fn: Callable[[Any], dict], jobs: Sequence[Any], desc: str, on_death: Callable[[Any], dict],
    progress: bool = True, must_see: Mapping[str, str | None] | None = None, info: RayRunInfo | None = None,
) -> list[dict]:
    """`[fn(j) for j in jobs]` on the connected Ray cluster (ray.init() first if this process has no
    connection; it honours RAY_ADDRESS), in job order; a job whose worker dies (twice: once among its
    block, once alone) yields `on_death(job)` instead of failing the batch. `must_see` maps paths to the
    content every node must read there (None: must exist); `info`, when given, is filled in."""
    import ray  # lazily: see the module docstring
    import ray.data

    info = info if info is not None else RayRunInfo()
    must_see = dict(must_see or {})
    info.cluster_nodes, info.cluster_cpus = connect()
    results: list[dict | None] = [None] * len(jobs)
    done = [False] * len(jobs)
    if not jobs:
        return []
    payloads = [pickle.dumps(j) for j in jobs]
    bar = tqdm(total=len(jobs), desc=desc, unit="file", mininterval=0.5, disable=not progress)
    try:
        slots = max(1, int(info.cluster_cpus))
        n_blocks = min(len(jobs), max(4 * slots, math.ceil(len(jobs) / MAX_JOBS_PER_BLOCK)))
        ds = ray.data.from_items([{"i": i, "job": p} for i, p in enumerate(payloads)], override_num_blocks=n_blocks)
        ctx = ds.context  # this dataset's own copy: the process-wide DataContext is left alone
        ctx.max_errored_blocks = -1  # a block whose worker died twice is dropped; its jobs are re-run alone
        ctx.enable_progress_bars = False  # one bar per stage, ours
        with warnings.catch_warnings():
            # max_retries has no named parameter in Ray 2.60 and goes through ray_remote_args, deprecated
            # there; without it a job that kills its worker each time is retried forever (Ray Data's -1)
            warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
            ds = ds.map(_Decode(fn, must_see), num_cpus=1, max_retries=1)
        block_log = logging.getLogger(_BLOCK_ERROR_LOGGER)
        level = block_log.level
        block_log.setLevel(logging.CRITICAL)
        try:
            for row in ds.iter_rows():
                i = int(row["i"])
                results[i], done[i] = _unpack(row["payload"]), True
                info.jobs_by_node[row["node"]] += 1
                bar.update()
        finally:
            block_log.setLevel(level)
        suspects = [i for i, ok in enumerate(done) if not ok]  # their blocks were dropped
        if suspects:
            info.isolated += len(suspects)
            alone = ray.remote(num_cpus=1, max_retries=0)(_alone)
            refs = {i: alone.remote(fn, payloads[i], must_see) for i in suspects}
            for i, ref in refs.items():
                try:
                    payload, node = ray.get(ref)
                except (ray.exceptions.WorkerCrashedError, ray.exceptions.OutOfMemoryError,
                        ray.exceptions.NodeDiedError):
                    results[i] = on_death(jobs[i])
                    info.died += 1
                else:
                    results[i] = _unpack(payload)
                    info.jobs_by_node[node] += 1
                bar.update()
    finally:
        bar.close()
    return results  # type: ignore[return-value]
