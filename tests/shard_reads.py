"""Which ECGs each Ray Train worker reads, and on which node: the training and probing data path of the
platform (EcgDataset over the cohort's memory-mapped cache, `train_loader`'s DistributedSampler, the
evaluation `shard_loader`) run by `fit` on the Ray cluster at RAY_ADDRESS. Run as a script, so that the loop
below travels to the workers by value: `python tests/shard_reads.py --cohort DIR --workers N --out DIR`.

Every worker writes `rank<r>.json`: its node id, whether the cache it read is a memory map (no copy), and a
checksum of each sample it read, by split and index. The test (tests/test_sharded_reads.py) checks them.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from stence.config import from_dict, load_config
from stence.data.cohort_io import Cohort
from stence.data.datasets import EcgDataset
from stence.train.common import set_epoch, shard_loader, train_loader
from stence.train.driver import ensure_ray, fit
from stence.train.worker import report, worker_info

TASK = "50"  # one threshold: every ECG of the split is a sample


def checksums(batches: Any) -> dict[int, float]:
    """{sample index: sum of its ECG window} over the batches a worker was given."""
    out: dict[int, float] = {}
    for batch in batches:
        for i, ecg in zip(batch["index"].tolist(), batch["ecg"], strict=True):
            out[int(i)] = float(ecg.double().sum())
    return out


def shard_loop(config: dict[str, Any]) -> None:
    import ray

    cfg = from_dict(config["config"])
    info = worker_info()
    cohort = Cohort.open(cfg.data.cohort)  # as the pretraining loop opens it
    train = EcgDataset(cohort, "train", cfg.data, TASK, train=False)
    loader, sampler = train_loader(train, config["global_batch"], info, None, seed=0)
    set_epoch(sampler, [train], 0, 0)
    val = EcgDataset(cohort, "val", cfg.data, TASK, train=False)
    out = {"rank": info.rank, "world": info.world_size, "node": ray.get_runtime_context().get_node_id(),
           "memmap": isinstance(cohort.ecg_cache, np.memmap),
           "train": checksums(loader), "val": checksums(shard_loader(val, 8, info, None))}
    Path(config["out"], f"rank{info.rank}.json").write_text(json.dumps(out))
    report({"epoch": 1})


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--cohort", required=True)
    p.add_argument("--workers", type=int, required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--storage", required=True)
    p.add_argument("--resource", default="shard")
    args = p.parse_args()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    cfg = load_config(None, [f"data.cohort={args.cohort}", f"train.workers={args.workers}",
                             f"train.storage_path={args.storage}", "tracking.enabled=false",
                             f"train.worker_resources={args.resource}=1", f"train.name=shards-{args.workers}"])
    ensure_ray()  # RAY_ADDRESS: the cluster
    fit(shard_loop, cfg, stage="shards", loop_config={"out": args.out, "global_batch": 8}, metric="epoch")


if __name__ == "__main__":
    main()
