"""Scorers in MLflow: log one as a pyfunc model, register versions with their provenance, move the
`champion` alias only when a version is better on the same metric and cohort (loading one back:
stence.serving.fetch).

MLflow 3: stages are deprecated, so promotion is the alias `champion` (`models:/NAME@champion`). Every
function takes the tracking URI explicitly (default: `resolve_tracking_uri` of the default config) and
uses the `MlflowClient` bound to it (stence.tracking.client); only `log_scorer` must briefly point
MLflow's global URI at it, because `Model.log` has no client argument. Call these from the driver, never
from Ray workers. The version tags are in stence.tracking.tags.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import json
import math
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.exceptions import MlflowException
from mlflow.models import Model

from stence.config import STANDARD_LEADS, ConfigError, config_hash, from_dict
from stence.data.contract import contract_of_spec
from stence.data.contract_apply import apply_contract
from stence.data.synth_ecg import sample_patient, simulate_ecg
from stence.models.scorer import load_scorer, scorer_metadata
from stence.serving.pyfunc import ENTRY_CODE, INPUT_NAME, SCORER_ARTIFACT, as_batch, scorer_signature
from stence.tracking.client import global_tracking_uri, project_dir, tracking_client, uri_or_default
from stence.tracking.tags import (
    CODE_COMMIT_TAG,
    COHORT_FINGERPRINT_TAG,
    CONFIG_HASH_TAG,
    INPUT_CONTRACT_TAG,
    METRIC_HI_TAG,
    METRIC_INTERVAL_TAG,
    METRIC_LO_TAG,
    METRIC_TAG,
    METRIC_VALUE_TAG,
    PROMOTION_TAG,
    SEED_TAG,
    SWEEP_TAG,
    TASK_TAG,
)

CHAMPION = "champion"
SCORER_FILE = "scorer.pt"
MODEL_TYPE = "stence-scorer"

UNKNOWN = "unknown"  # a provenance tag that could not be read


# ---------------------------------------------------------------------------------------------------
# logging


EXAMPLE_FS, EXAMPLE_SECONDS = 500.0, 10.0  # the synthetic recording the input example is prepared from


def example_input(spec: dict[str, Any], n: int = 1, seed: int = 0) -> np.ndarray:
    """(n, n_leads, n_samples) float32 model inputs: n synthetic 10 s 12-lead recordings at 500 Hz (the
    dipole-model ECG of stence.data.synth_ecg, in mV, distinct per seed) prepared by the scorer's input
    contract (`apply_contract`), leads in `spec["leads"]` order. The registered model's input example."""
    contract = contract_of_spec(spec)
    unknown = [lead for lead in spec["leads"] if lead not in STANDARD_LEADS]
    if unknown:
        raise ValueError(f"no synthetic signal for the leads {unknown} (known: {STANDARD_LEADS})")
    rows = [STANDARD_LEADS.index(lead) for lead in spec["leads"]]
    rng = np.random.default_rng(seed)
    crops = []
    for _ in range(n):
        sig = simulate_ecg(sample_patient(rng, {}), EXAMPLE_FS, EXAMPLE_SECONDS, rng).signal  # (12, 5000) mV
        crops.append(apply_contract(sig[rows], EXAMPLE_FS, contract))  # (n_leads, n_samples)
    return np.stack(crops).astype(np.float32)


def model_metadata(meta: dict[str, Any]) -> dict[str, Any]:
    """The MLmodel `metadata` of a logged scorer: its task and input spec (rate, window, leads, lead order and
    the whole input contract under "contract"), from `scorer_metadata`."""
    return {"task": str(meta["task"]), "input_spec": json.loads(contract_json(meta))}


def contract_json(meta: dict[str, Any]) -> str:
    """The input spec of `scorer_metadata` as JSON: the one form of the contract that MLflow stores (model
    metadata, the `stence.input_contract` tag of logged models and versions)."""
    return json.dumps(meta["input_spec"], sort_keys=True)


def model_requirements() -> list[str]:
    """Pinned requirements of the pyfunc model (given explicitly: no inference subprocess at log time)."""
    try:
        version = importlib.metadata.version("stence")
    except importlib.metadata.PackageNotFoundError:  # running from a source tree that is not installed
        version = getattr(importlib.import_module("stence"), "__version__", "0")
    return [f"stence=={version}", f"torch=={torch.__version__.split('+')[0]}",
            f"mlflow=={mlflow.__version__}", f"numpy=={np.__version__}", f"pandas=={pd.__version__}"]


def log_scorer(scorer_path: str | Path, run_id: str, uri: str, name: str = "model",
               example: np.ndarray | None = None) -> str:
    """Log a scorer file as an MLflow pyfunc model of run `run_id`; returns its `models:/<model_id>` URI.

    The model's only artifact is the scorer file (weights-only); its code is the installed package
    (see stence/serving/pyfunc.py for why). The signature is explicit (`scorer_signature`): input `ecg`,
    float32 (-1, n_leads, n_samples) in the contract's lead order; output `probability` (one double column
    per task: `probability_<k>` for multi-label heads); parameter `output` ("probability" | "embedding" |
    "all"). The input example is `example[:1]` (default: `example_input`, a synthetic recording prepared by
    the contract). The task and the input spec with its contract are the model's metadata (MLmodel
    `metadata`, shown by `get_model_info` and the loaded pyfunc's `metadata.metadata`), the same JSON as the
    `stence.input_contract` tag of the logged model and of its registered versions.
    """
    scorer_path = Path(scorer_path).resolve()
    scorer = load_scorer(scorer_path)
    meta = scorer_metadata(scorer_path)
    x = as_batch(example if example is not None else example_input(scorer.input_spec), scorer.input_spec)
    signature = scorer_signature(scorer.input_spec, scorer.head.n_out)
    client = tracking_client(uri)
    run = client.get_run(run_id)
    logged = client.create_logged_model(
        run.info.experiment_id, name=name, source_run_id=run_id, model_type=MODEL_TYPE,
        tags={TASK_TAG: str(meta["task"]), INPUT_CONTRACT_TAG: contract_json(meta)},
    )
    with tempfile.TemporaryDirectory() as tmp:
        entry = Path(tmp) / "stence_scorer_model.py"
        entry.write_text(ENTRY_CODE)
        with global_tracking_uri(uri):
            info = Model.log(
                artifact_path=None, name=name, flavor=mlflow.pyfunc, run_id=run_id, model_id=logged.model_id,
                python_model=str(entry), artifacts={SCORER_ARTIFACT: str(scorer_path)},
                signature=signature, input_example={INPUT_NAME: x[:1]}, pip_requirements=model_requirements(),
                metadata=model_metadata(meta),
            )
    return info.model_uri


# ---------------------------------------------------------------------------------------------------
# provenance tags


def code_commit(repo: str | Path | None = None) -> str:
    """`git rev-parse HEAD` of the source tree (default: the one holding this package), else "unknown"."""
    where = Path(repo) if repo else Path(__file__).resolve().parents[2]
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True,
                             timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return UNKNOWN
    return out.stdout.strip() or UNKNOWN


def cohort_fingerprint(cfg_dict: dict[str, Any]) -> str:
    """Fingerprint of the cohort a config trained on (`data.cohort`/cohort.json), else "unknown"."""
    root = (cfg_dict.get("data") or {}).get("cohort")
    if not root:
        return UNKNOWN
    path = Path(root)
    if not path.is_absolute():
        path = project_dir() / path
    try:
        return str(json.loads((path / "cohort.json").read_text())["fingerprint"]) or UNKNOWN
    except (OSError, ValueError, KeyError):
        return UNKNOWN


def _config_hash(cfg_dict: dict[str, Any]) -> str:
    if not cfg_dict:
        return UNKNOWN
    try:
        return config_hash(from_dict(cfg_dict))
    except (ConfigError, TypeError, ValueError):
        return UNKNOWN


def _fmt(v: Any) -> str:
    return f"{float(v):.4f}" if isinstance(v, (int, float)) else str(v)


def scorer_version_tags(meta: dict[str, Any], metric: str = "auroc", cohort: str | None = None,
                        sweep: str | None = None, commit: str | None = None) -> dict[str, str]:
    """Version tags from `scorer_metadata`: metric (named "<task>/<metric>") with its bootstrap interval,
    cohort fingerprint, config hash, code commit, seed, input contract, task and sweep (if any)."""
    cfg = meta.get("config") or {}
    metrics = meta.get("metrics") or {}
    if metric not in metrics:
        raise ValueError(f"scorer has no metric {metric!r}; it has {sorted(metrics)}")
    value = float(metrics[metric])
    lo, hi = float(metrics.get(f"{metric}_lo", math.nan)), float(metrics.get(f"{metric}_hi", math.nan))
    tags = {
        TASK_TAG: str(meta["task"]),
        METRIC_TAG: f"{meta['task']}/{metric}",
        METRIC_VALUE_TAG: repr(value), METRIC_LO_TAG: repr(lo), METRIC_HI_TAG: repr(hi),
        METRIC_INTERVAL_TAG: f"{_fmt(value)} [{_fmt(lo)}, {_fmt(hi)}]",
        COHORT_FINGERPRINT_TAG: cohort or cohort_fingerprint(cfg),
        CONFIG_HASH_TAG: _config_hash(cfg),
        CODE_COMMIT_TAG: commit or code_commit(),
        SEED_TAG: str((cfg.get("train") or {}).get("seed", UNKNOWN)),
        INPUT_CONTRACT_TAG: contract_json(meta),
    }
    if sweep:
        tags[SWEEP_TAG] = sweep
    return tags


# ---------------------------------------------------------------------------------------------------
# registry


def _model_id(model_uri: str) -> str | None:
    """`models:/m-...` (a logged model, not `models:/NAME/VERSION` or `@alias`) -> its id."""
    rest = model_uri[len("models:/"):] if model_uri.startswith("models:/") else ""
    return rest if rest and "/" not in rest and "@" not in rest else None


def register(model_uri: str, name: str, tags: dict[str, Any] | None = None, *, uri: str | None = None) -> str:
    """Create a new version of registered model `name` (created if missing) from a logged model URI
    (`models:/<model_id>` from `log_scorer`, or `runs:/<run_id>/<path>`); returns the version."""
    client = tracking_client(uri)
    try:
        client.create_registered_model(name, description="StenCE ECG scorers (encoder + stenosis head)")
    except MlflowException as e:
        if "already exists" not in str(e).lower() and e.error_code not in ("RESOURCE_ALREADY_EXISTS",
                                                                            "ALREADY_EXISTS"):
            raise
    run_id, model_id = None, _model_id(model_uri)
    if model_id:
        run_id = client.get_logged_model(model_id).source_run_id
    elif model_uri.startswith("runs:/"):
        run_id = model_uri[len("runs:/"):].split("/", 1)[0]
    # the registry store resolves `models:/<id>` sources through the global URI
    with global_tracking_uri(uri_or_default(uri)):
        mv = client.create_model_version(name, source=model_uri, run_id=run_id,
                                         tags={k: str(v) for k, v in (tags or {}).items()}, model_id=model_id)
    return str(mv.version)


def _tag_float(tags: dict[str, str], key: str) -> float:
    try:
        return float(tags.get(key, "nan"))
    except ValueError:
        return math.nan


def decide_promotion(champion: dict[str, str] | None, champion_version: str | None, metric_name: str,
                     value: float, lo: float, cohort: str, strict: bool) -> tuple[bool, str]:
    """Pure decision: (promote?, reason). `champion` are the current champion's version tags (None: no
    champion yet). Same metric name and same known cohort fingerprint are required; then the value (or,
    with `strict`, the bootstrap lower bound) must be strictly greater than the champion's value."""
    if champion is None:
        return True, "first version: no champion yet"
    cv = f"v{champion_version}"
    if champion.get(METRIC_TAG) != metric_name:
        return False, f"{cv} was scored on {champion.get(METRIC_TAG)!r}, this version on {metric_name!r}"
    theirs = champion.get(COHORT_FINGERPRINT_TAG, UNKNOWN)
    if cohort == UNKNOWN or theirs == UNKNOWN:
        return False, f"cohort fingerprint unknown (this: {cohort}, {cv}: {theirs}): cannot compare"
    if cohort != theirs:
        return False, f"different cohort: {cohort} vs {theirs} of {cv}; metrics are not comparable"
    best = _tag_float(champion, METRIC_VALUE_TAG)
    mine, what = (lo, "lower bound") if strict else (value, "value")
    if not math.isfinite(mine):
        return False, f"{metric_name} {what} is undefined"
    if math.isfinite(best) and not mine > best:
        return False, f"{metric_name} {what} {mine:.4f} does not beat {cv}'s {best:.4f}"
    return True, f"{metric_name} {what} {mine:.4f} beats {cv}'s {best:.4f}"


def champion_version(name: str, *, uri: str | None = None, alias: str = CHAMPION) -> Any | None:
    """The ModelVersion holding `alias`, or None."""
    try:
        return tracking_client(uri).get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def promote_if_better(name: str, version: str, metric_name: str, value: float, lo: float,
                      cohort_fingerprint: str, strict: bool, *, uri: str | None = None,
                      alias: str = CHAMPION) -> bool:
    """Move `alias` to `version` when it beats the current holder (see `decide_promotion`); a first
    version always gets it. The candidate's metric/cohort tags and the decision are written on it."""
    client = tracking_client(uri)
    version = str(version)
    candidate = {METRIC_TAG: metric_name, METRIC_VALUE_TAG: repr(float(value)), METRIC_LO_TAG: repr(float(lo)),
                   COHORT_FINGERPRINT_TAG: cohort_fingerprint}
    for k, v in candidate.items():
        client.set_model_version_tag(name, version, k, v)
    current = champion_version(name, uri=uri, alias=alias)
    if current is not None and str(current.version) == version:
        ok, why = True, f"already {alias}"
    else:
        ok, why = decide_promotion(dict(current.tags) if current else None,
                                   str(current.version) if current else None,
                                   metric_name, float(value), float(lo), cohort_fingerprint, strict)
    if ok:
        client.set_registered_model_alias(name, alias, version)
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
    verdict = "promoted to" if ok else "not promoted to"
    client.set_model_version_tag(name, version, PROMOTION_TAG, f"{verdict} {alias}: {why} ({stamp})")
    return ok


def set_alias(name: str, version: str, alias: str = CHAMPION, *, uri: str | None = None) -> None:
    """Move `alias` to `version` unconditionally (a deliberate override by hand)."""
    client = tracking_client(uri)
    client.set_registered_model_alias(name, alias, str(version))
    client.set_model_version_tag(name, str(version), PROMOTION_TAG,
                                 f"{alias} set by hand ({time.strftime('%Y-%m-%dT%H:%M:%S')})")


def list_models(name: str, *, uri: str | None = None) -> list[dict[str, Any]]:
    """Versions of `name`, newest first: version, aliases, metric (with interval), created, run id, ..."""
    client = tracking_client(uri)
    try:
        aliases = dict(client.get_registered_model(name).aliases or {})  # alias -> version
    except MlflowException:
        return []
    rows = []
    for mv in client.search_model_versions(f"name = '{name}'"):
        tags = dict(mv.tags or {})
        metric = tags.get(METRIC_TAG, "")
        rows.append({
            "version": int(mv.version),
            "aliases": sorted(a for a, v in aliases.items() if str(v) == str(mv.version)),
            "metric": f"{metric} {tags.get(METRIC_INTERVAL_TAG, tags.get(METRIC_VALUE_TAG, ''))}".strip(),
            "created": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(mv.creation_timestamp / 1000)),
            "run_id": mv.run_id or "",
            "cohort": tags.get(COHORT_FINGERPRINT_TAG, ""),
            "decision": tags.get(PROMOTION_TAG, ""),
        })
    return sorted(rows, key=lambda r: -r["version"])


# ---------------------------------------------------------------------------------------------------
# loading


__all__ = [
    "CHAMPION",
    "champion_version",
    "code_commit",
    "cohort_fingerprint",
    "contract_json",
    "decide_promotion",
    "example_input",
    "list_models",
    "log_scorer",
    "model_metadata",
    "promote_if_better",
    "register",
    "scorer_version_tags",
    "set_alias",
]
