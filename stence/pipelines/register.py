"""The registration pipeline: log a scorer as an MLflow model in its run, register a version with its
provenance tags, and move the alias (`champion`) when it beats the current one on the same metric and cohort.

`stence register` (`register_source`) and the sweep's registration (`tune/champion.py`) both go through
`register_and_promote`: the metric, the cohort fingerprint (from the scorer's own config) and the tags have
one source. `stence models` lists the versions (`registered_versions`).
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from stence.config import Config, ConfigError, from_dict
from stence.models.scorer import scorer_metadata
from stence.serving import registry as reg
from stence.serving.fetch import fetch_scorer
from stence.tracking.client import resolve_tracking_uri, tracking_client
from stence.tracking.runs import Tracker, start_run
from stence.tracking.tags import (
    COHORT_FINGERPRINT_TAG,
    METRIC_LO_TAG,
    METRIC_TAG,
    METRIC_VALUE_TAG,
    PROMOTION_TAG,
    SCORER_PATH_TAG,
    STAGE_TAG,
    SWEEP_TAG,
)


class RegisterError(ValueError):
    """A scorer that cannot be registered (not found, or without the metric to compare); one line why."""


class ScorerNotFound(RegisterError):
    """No scorer where the source points (unknown run id, no scorer in the run, unreadable file)."""


@dataclass
class Registered:
    """A registered version: its name, number, logged model URI, tags, and what promotion decided."""

    name: str
    version: str
    model_uri: str
    tags: dict[str, str] = field(default_factory=dict)
    promoted: bool = False
    decision: str = ""
    run_id: str = ""  # the run the model was logged in


def register_scorer(cfg: Config, scorer: str | Path, run_id: str, name: str, metric: str = "auroc",
                    extra_tags: dict[str, str] | None = None) -> Registered:
    """Log `scorer` as an MLflow pyfunc model in run `run_id` and register it as a new version of `name`,
    tagged with its metric ("<task>/<metric>") and interval, cohort fingerprint, config hash, commit, seed and
    input contract (`extra_tags` on top). Raises ValueError when the scorer lacks the metric."""
    uri = resolve_tracking_uri(cfg)
    tags = {**reg.scorer_version_tags(scorer_metadata(scorer), metric), **(extra_tags or {})}
    model_uri = reg.log_scorer(scorer, run_id, uri)
    version = reg.register(model_uri, name, tags, uri=uri)
    return Registered(name, str(version), model_uri, tags, run_id=run_id)


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


def register_and_promote(cfg: Config, scorer: str | Path, run_id: str, name: str, *, metric: str = "auroc",
                         extra_tags: dict[str, str] | None = None, alias: str = "champion", strict: bool = False,
                         force: bool = False,
                         on_registered: Callable[[Registered], None] | None = None) -> Registered:
    """`register_scorer`, then `promote`: the one registration path of `stence register` and of the sweep's
    champion. `on_registered(version)` is called between the two. A scorer without `metric` raises
    RegisterError."""
    try:
        done = register_scorer(cfg, scorer, run_id, name, metric, extra_tags)
    except ValueError as e:
        raise RegisterError(str(e)) from e
    if on_registered is not None:
        on_registered(done)
    return promote(cfg, done, alias=alias, strict=strict, force=force)


def run_for_file(cfg: Config, scorer: Path, meta: dict) -> str:
    """A FINISHED run to own a scorer that came as a file: the scorer's own config, this CLI's tracking."""
    try:
        run_cfg = replace(from_dict(meta["config"]), tracking=cfg.tracking) if meta.get("config") else cfg
    except (ConfigError, TypeError, ValueError):
        run_cfg = cfg
    run_id = start_run(run_cfg, f"register-{scorer.parent.name}",
                       tags={STAGE_TAG: "register", SCORER_PATH_TAG: str(scorer.resolve())})
    Tracker(resolve_tracking_uri(cfg), run_id).end("FINISHED")
    return run_id


def source_run_id(source: str) -> str:
    """The run id a run reference names (`runs:/RUN_ID[/PATH]` or a bare id)."""
    return source[len("runs:/"):].split("/", 1)[0] if source.startswith("runs:/") else source


def register_source(cfg: Config, source: str, name: str | None = None, *, metric: str = "auroc",
                    alias: str = "champion", strict: bool = False, force: bool = False,
                    on_registered: Callable[[Registered], None] | None = None) -> Registered:
    """`stence register`: find the scorer `source` names (an MLflow run holding scorer.pt, runs:/RUN_ID, or a
    scorer file / folder, which gets a run of its own), register it as a new version of `name` (default
    `tracking.registered_model`) with the sweep its run belongs to, and promote it (`register_and_promote`).
    Raises ScorerNotFound when there is no scorer there, RegisterError when it lacks `metric`."""
    uri = resolve_tracking_uri(cfg)
    name = name or cfg.tracking.registered_model
    with tempfile.TemporaryDirectory(prefix="stence-register-") as tmp:
        try:
            scorer = fetch_scorer(source, tmp, uri=uri)
            meta = scorer_metadata(scorer)
        except Exception as e:  # unknown run id, no scorer in the run, unreadable file
            raise ScorerNotFound(f"cannot find a scorer in {source!r} (tracking URI {uri}): {e}") from e
        run_id = run_for_file(cfg, scorer, meta) if Path(source).expanduser().exists() else source_run_id(source)
        sweep = run_tags(cfg, run_id).get(SWEEP_TAG)
        return register_and_promote(cfg, scorer, run_id, name, metric=metric,
                                    extra_tags={SWEEP_TAG: sweep} if sweep else None, alias=alias,
                                    strict=strict, force=force, on_registered=on_registered)


@dataclass
class Versions:
    """The registered versions of a model (`reg.list_models` rows, newest first) at a tracking URI."""

    name: str
    uri: str
    rows: list[dict[str, Any]] = field(default_factory=list)


def registered_versions(cfg: Config, name: str | None = None) -> Versions:
    """`stence models`: the versions of `name` (default `tracking.registered_model`) in the configured store."""
    name = name or cfg.tracking.registered_model
    uri = resolve_tracking_uri(cfg)
    return Versions(name, uri, reg.list_models(name, uri=uri))


__all__ = ["RegisterError", "Registered", "ScorerNotFound", "Versions", "promote", "register_and_promote",
           "register_scorer", "register_source", "registered_versions", "run_for_file", "run_tags",
           "source_run_id"]
