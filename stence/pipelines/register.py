"""The registration pipeline: log a scorer as an MLflow model in its run, register a version with its
provenance tags, and move the alias (`champion`) when it beats the current one on the same metric and cohort.

`stence register` and the sweep's registration (`tune/champion.py`) both go through `register_scorer` and
`promote`: the metric, the cohort fingerprint (from the scorer's own config) and the tags have one source.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stence.config import Config
from stence.models.scorer import scorer_metadata
from stence.serving import registry as reg
from stence.tracking.client import resolve_tracking_uri, tracking_client
from stence.tracking.tags import (
    COHORT_FINGERPRINT_TAG,
    METRIC_LO_TAG,
    METRIC_TAG,
    METRIC_VALUE_TAG,
    PROMOTION_TAG,
)


@dataclass
class Registered:
    """A registered version: its name, number, logged model URI, tags, and what promotion decided."""

    name: str
    version: str
    model_uri: str
    tags: dict[str, str] = field(default_factory=dict)
    promoted: bool = False
    decision: str = ""


def register_scorer(cfg: Config, scorer: str | Path, run_id: str, name: str, metric: str = "auroc",
                    extra_tags: dict[str, str] | None = None) -> Registered:
    """Log `scorer` as an MLflow pyfunc model in run `run_id` and register it as a new version of `name`,
    tagged with its metric ("<task>/<metric>") and interval, cohort fingerprint, config hash, commit, seed and
    input contract (`extra_tags` on top). Raises ValueError when the scorer lacks the metric."""
    uri = resolve_tracking_uri(cfg)
    tags = {**reg.scorer_version_tags(scorer_metadata(scorer), metric), **(extra_tags or {})}
    model_uri = reg.log_scorer(scorer, run_id, uri)
    version = reg.register(model_uri, name, tags, uri=uri)
    return Registered(name, str(version), model_uri, tags)


def promote(cfg: Config, registered: Registered, *, alias: str = "champion", strict: bool = False,
            force: bool = False) -> Registered:
    """Move `alias` to the version if it beats the alias's version on the same metric and cohort (`strict`:
    its bootstrap lower bound must), or unconditionally with `force`; the decision is tagged on the version."""
    uri = resolve_tracking_uri(cfg)
    t = registered.tags
    if force:
        reg.set_alias(registered.name, registered.version, alias, uri=uri)
        registered.promoted, registered.decision = True, f"{alias} -> version {registered.version} (forced)"
        return registered
    registered.promoted = bool(reg.promote_if_better(
        registered.name, registered.version, t[METRIC_TAG], float(t[METRIC_VALUE_TAG]), float(t[METRIC_LO_TAG]),
        t[COHORT_FINGERPRINT_TAG], strict, uri=uri, alias=alias))
    version = tracking_client(uri).get_model_version(registered.name, registered.version)
    registered.decision = version.tags.get(PROMOTION_TAG, "")
    return registered


def run_tags(cfg: Config, run_id: str) -> dict[str, Any]:
    """The tags of an MLflow run (the sweep a probe run belongs to travels to its version)."""
    return dict(tracking_client(resolve_tracking_uri(cfg)).get_run(run_id).data.tags)


__all__ = ["Registered", "promote", "register_scorer", "run_tags"]
