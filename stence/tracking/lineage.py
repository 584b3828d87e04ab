"""The cohort a run reads, logged as an MLflow dataset input: the Dataset column of the runs table and the
lineage of a registered model then name the cohort that trained and evaluated it.

What is logged (MLflow 3 entities, nothing read into pandas):
  name     `cohort-<context>`: a fixed word, never the folder's name (the user chooses the cohort path, and
           folder names may carry MRNs or patient names). The context is part of the name because MLflow
           keeps one input per (name, digest) and run: a run reading train, val and test logs three.
  digest   the cohort fingerprint (`cohort.json`, a content hash of its tables and caches).
  source   type `stence_cohort`, `{"uri": "cohort://<fingerprint>"}`: content-addressed, so it names the cohort
           without its location; no path (absolute or relative) ever reaches MLflow from here.
  profile  counts of the splits the context covers (pairs, patients), from `cohort.json`.
  context  the input tag `mlflow.data.context`: `train`, `val`, `test`, or `train+val` (pretraining and
           stage A train on one split and select checkpoints on the other).

A tracking problem (store down, a folder that is not a cohort) is a warning: lineage never fails training.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from stence.data.cohort_meta import read_cohort_meta
from stence.tracking.client import tracking_client
from stence.tracking.replay import bounded_http
from stence.tracking.tags import DATASET_CONTEXT_TAG

logger = logging.getLogger("stence.tracking")

DATASET_NAME = "cohort"  # name prefix of every cohort input (`cohort-train`, `cohort-train+val`, ...)
SOURCE_TYPE = "stence_cohort"
SOURCE_SCHEME = "cohort://"
CONTEXTS = ("train", "val", "test", "train+val")  # the usual ones; any other non-empty word is accepted


def cohort_dataset(cohort_root: str | Path, context: str) -> Any:
    """The `mlflow.entities.Dataset` of an ingested cohort as read in `context` (see the module docstring).
    Reads only `cohort.json`; FileNotFoundError when the folder is not a complete cohort."""
    from mlflow.entities import Dataset  # mlflow (~1.5 s to import): only when a run is tracked

    meta = read_cohort_meta(cohort_root)
    fp = str(meta["fingerprint"])
    splits = [s for s in context.split("+") if s]
    pairs, patients = meta.get("pairs_by_split") or {}, meta.get("splits") or {}
    profile = {"splits": splits,
               "pairs": sum(int(pairs.get(s, 0)) for s in splits),
               "patients": sum(int(patients.get(s, 0)) for s in splits),
               "created_unix": meta.get("created_unix")}
    return Dataset(name=f"{DATASET_NAME}-{context}", digest=fp, source_type=SOURCE_TYPE,
                   source=json.dumps({"uri": f"{SOURCE_SCHEME}{fp}"}), profile=json.dumps(profile))


def log_cohort_input(uri: str | None, run_id: str | None, cohort_root: str | Path, context: str) -> bool:
    """Log the cohort at `cohort_root` as a dataset input of run `run_id` with `context`; True when logged.

    Does nothing without a run (tracking disabled: `uri` or `run_id` None). Idempotent: logging the same
    cohort and context into a run again (a resumed trial) adds nothing. A tracking problem never raises: a
    store that is down (MLflow's HTTP retries bounded to seconds, as for spool replays) or a folder that is
    not a cohort logs a warning and returns False. Only an empty `context` (a caller's bug) is a ValueError."""
    if not context or not isinstance(context, str):  # a bug of the caller, not a tracking problem
        raise ValueError(f"context must be a non-empty split name such as {CONTEXTS}, got {context!r}")
    if not (uri and run_id):
        return False
    from mlflow.entities import DatasetInput, InputTag  # mlflow (~1.5 s): only when a run is tracked

    try:
        dataset = cohort_dataset(cohort_root, context)
        with bounded_http():
            tracking_client(uri).log_inputs(
                run_id, datasets=[DatasetInput(dataset, tags=[InputTag(DATASET_CONTEXT_TAG, context)])])
    except Exception as e:  # noqa: BLE001 - lineage is best effort: training goes on
        # the cohort's location stays out of the message too: logs are shared and may be tracked
        logger.warning("tracking degraded: the %s cohort input of MLflow run %s was not logged (%s: %s)",
                       context, run_id, type(e).__name__, _without_path(str(e), cohort_root))
        return False
    return True


def _without_path(text: str, root: str | Path) -> str:
    """`text` with the cohort path replaced by <cohort> (a FileNotFoundError names it)."""
    for p in {str(root), str(Path(root).expanduser().resolve())}:
        if p:
            text = text.replace(p, "<cohort>")
    return text


__all__ = ["CONTEXTS", "DATASET_NAME", "SOURCE_TYPE", "cohort_dataset", "log_cohort_input"]
