"""Load a scorer back from MLflow: an alias (`models:/NAME@champion`), a version, a logged model, a run,
or a local file; always from the weights-only scorer file (no model code is unpickled).

An alias is resolved to its version once, and that exact version is downloaded, so what is reported as
scored (`Lineage`: name, version, run, the version's provenance tags) is what was scored, even if the
alias moves meanwhile. `stence predict` prints it, so a champion swapped behind the platform's back shows.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import mlflow.artifacts

from stence.models.scorer import Scorer, load_scorer, scorer_metadata
from stence.outputs import claim_output
from stence.serving.registry import SCORER_FILE
from stence.tracking.client import global_tracking_uri, tracking_client, uri_or_default
from stence.tracking.tags import (
    CODE_COMMIT_TAG,
    COHORT_FINGERPRINT_TAG,
    CONFIG_HASH_TAG,
    METRIC_INTERVAL_TAG,
    METRIC_TAG,
    METRIC_VALUE_TAG,
    PROMOTION_TAG,
    SWEEP_TAG,
)

# Tags every version registered by stence carries (`scorer_version_tags`); none of them: registered elsewhere.
LINEAGE_TAGS = (METRIC_TAG, COHORT_FINGERPRINT_TAG, CODE_COMMIT_TAG, CONFIG_HASH_TAG)


@dataclass(frozen=True)
class Lineage:
    """Where a loaded scorer came from: the reference given and, for a registered version, its name,
    version, alias, source run and tags (the provenance `scorer_version_tags` and promotion wrote)."""

    source: str
    name: str | None = None
    version: str | None = None
    alias: str | None = None
    run_id: str | None = None
    tags: dict[str, str] = field(default_factory=dict)

    def describe(self) -> str:
        """One line: `model NAME version V (run R, alias A) sweep=..., metric=..., cohort=..., commit=...`."""
        if self.version is None:
            kind = f"run {self.run_id}" if self.run_id else "a file, not a registered version"
            return f"model {self.source} ({kind}; no registry lineage)"
        t = self.tags
        where = ", ".join(x for x in (f"run {self.run_id or '-'}", self.alias and f"alias {self.alias}") if x)
        interval = t.get(METRIC_INTERVAL_TAG, t.get(METRIC_VALUE_TAG, ""))
        metric = f"{t.get(METRIC_TAG, '-')} {interval}".strip()
        fields = {"sweep": t.get(SWEEP_TAG, "-"), "metric": metric, "cohort": t.get(COHORT_FINGERPRINT_TAG, "-"),
                  "commit": t.get(CODE_COMMIT_TAG, "-"), "config": t.get(CONFIG_HASH_TAG, "-"),
                  "promotion": t.get(PROMOTION_TAG, "-")}
        return (f"model {self.name} version {self.version} ({where}) "
                + ", ".join(f"{k}={v}" for k, v in fields.items()))

    def warnings(self) -> list[str]:
        """What should make a user doubt this version: no stence provenance at all, or an alias that no
        stence promotion (nor a deliberate `set_alias`) moved to it."""
        if self.version is None:
            return []
        out = []
        mv = f"version {self.version} of {self.name}"
        if not any(self.tags.get(k) for k in LINEAGE_TAGS):
            out.append(f"{mv} carries no stence lineage tags (metric, cohort, commit, config): it was not "
                       "registered by stence; find out who registered it before trusting these scores")
        if self.alias:
            decision = self.tags.get(PROMOTION_TAG, "")
            if not (decision.startswith(f"promoted to {self.alias}") or decision.startswith(f"{self.alias} set by hand")):
                out.append(f"no record that stence moved @{self.alias} to {mv} (promotion tag: "
                           f"{decision or 'none'}); check the registry before trusting these scores")
        return out


def _registry_ref(ref: str) -> tuple[str, str | None, str | None] | None:
    """`models:/NAME@ALIAS` -> (NAME, None, ALIAS); `models:/NAME/VERSION` -> (NAME, VERSION, None);
    anything else (a logged model `models:/m-...`, runs:/, a file) -> None."""
    if not ref.startswith("models:/"):
        return None
    rest = ref[len("models:/"):].strip("/")
    if "@" in rest and "/" not in rest:
        name, _, alias = rest.rpartition("@")
        return name, None, alias
    name, _, version = rest.rpartition("/")
    return (name, version, None) if name and version.isdigit() else None


def _pin_version(client: Any, ref: str) -> tuple[str, Lineage]:
    """The reference to download (an alias replaced by the version it points at now) and its lineage."""
    parsed = _registry_ref(ref)
    if parsed is None:
        if ref.startswith("runs:/"):
            return ref, Lineage(source=ref, run_id=ref[len("runs:/"):].split("/", 1)[0])
        if ref.startswith("models:/") and "/" not in ref[len("models:/"):]:  # a logged model: its run is known
            return ref, Lineage(source=ref, run_id=client.get_logged_model(ref[len("models:/"):]).source_run_id)
        return ref, Lineage(source=ref)
    name, version, alias = parsed
    mv = client.get_model_version_by_alias(name, alias) if alias else client.get_model_version(name, version)
    lineage = Lineage(source=ref, name=name, version=str(mv.version), alias=alias, run_id=mv.run_id or None,
                      tags={k: str(v) for k, v in (mv.tags or {}).items()})
    return f"models:/{name}/{mv.version}", lineage

FETCHED_KIND = "fetched"  # output kind in the ownership marker (stence/outputs.py)


def _find_scorer(root: Path) -> Path:
    """The scorer file at or under `root` (a file, a scorer folder, or a downloaded pyfunc model)."""
    if root.is_file():
        return root
    for candidate in (root / SCORER_FILE, root / "artifacts" / SCORER_FILE):
        if candidate.is_file():
            return candidate
    found = sorted(root.rglob(SCORER_FILE))
    if not found:
        raise FileNotFoundError(f"no {SCORER_FILE} under {root}")
    return found[0]


def _run_artifact_scorer(client: Any, run_id: str, path: str = "") -> str | None:
    """Artifact path of the first scorer file in a run (breadth first), or None."""
    queue = [path]
    while queue:
        here = queue.pop(0)
        for f in client.list_artifacts(run_id, here or None):
            if f.is_dir:
                queue.append(f.path)
            elif Path(f.path).name == SCORER_FILE:
                return f.path
    return None


def _resolve_run_ref(client: Any, ref: str) -> str:
    """`runs:/RUN_ID[/PATH]` -> the run's scorer file artifact, else the model it logged (named PATH, if
    given; the latest one otherwise) as `models:/<model_id>` (MLflow 3 keeps logged models out of the
    run's artifact tree)."""
    run_id, _, path = ref[len("runs:/"):].partition("/")
    path = path.strip("/")
    found = _run_artifact_scorer(client, run_id, "" if path.endswith(".pt") else path)
    if found and (not path.endswith(".pt") or found == path):
        return f"runs:/{run_id}/{found}"
    run = client.get_run(run_id)
    outputs = sorted(getattr(run.outputs, "model_outputs", None) or [], key=lambda o: o.step)
    for out in reversed(outputs):
        if not path or client.get_logged_model(out.model_id).name == path:
            return f"models:/{out.model_id}"
    raise FileNotFoundError(f"run {run_id} has no {SCORER_FILE} artifact{f' under {path!r}' if path else ''} "
                            "and no logged model")


def fetch_scorer(ref: str, dst: str | Path, *, uri: str | None = None) -> Path:
    """Local path of the scorer file `ref` names, downloading it into `dst` when it lives in MLflow.

    `ref`: `models:/NAME@ALIAS`, `models:/NAME/VERSION`, `models:/<model_id>`, `runs:/RUN_ID[/PATH]`,
    a bare run id, `NAME@ALIAS`, or a local scorer file / folder.
    """
    return _fetch(ref, dst, uri=uri)[0]


def _fetch(ref: str, dst: str | Path, *, uri: str | None = None) -> tuple[Path, Lineage]:
    """`fetch_scorer`, and the lineage of what was downloaded (an alias pinned to one version first)."""
    local = Path(ref).expanduser()
    if local.exists():
        return _find_scorer(local), Lineage(source=ref)
    tracking = uri_or_default(uri)
    if not ref.startswith(("models:/", "runs:/")):
        if "@" in ref and "/" not in ref:  # NAME@ALIAS shorthand
            ref = f"models:/{ref}"
        elif len(ref) == 32 and all(c in "0123456789abcdef" for c in ref):  # a run id
            ref = f"runs:/{ref}"
        else:
            raise FileNotFoundError(f"{ref!r} is neither a file nor a models:/ or runs:/ URI")
    given = ref
    if ref.startswith("runs:/"):
        ref = _resolve_run_ref(tracking_client(tracking), ref)
    claim_output(dst, FETCHED_KIND, overwrite=True)  # ours (re-fetched) or new; never a folder stence did not write
    ref, lineage = _pin_version(tracking_client(tracking), ref)
    run_id = lineage.run_id or (given[len("runs:/"):].split("/", 1)[0] if given.startswith("runs:/") else None)
    lineage = replace(lineage, source=given, run_id=run_id)
    with global_tracking_uri(tracking):  # models:/ resolution ignores the explicit URIs in places
        out = mlflow.artifacts.download_artifacts(artifact_uri=ref, dst_path=str(dst), tracking_uri=tracking,
                                                  registry_uri=tracking)
    return _find_scorer(Path(out)), lineage


def load_champion(uri_or_alias: str, *, uri: str | None = None) -> Scorer:
    """The Scorer behind an alias, version, run or file (see `fetch_scorer`), rebuilt from the weights-only
    scorer file (no model code is unpickled). `scorer.metadata` holds its task, input contract, config and
    metrics; `scorer.source` the reference it came from; `scorer.lineage` the registered version it is
    (name, version, run, provenance tags; see `Lineage`)."""
    tmp = tempfile.mkdtemp(prefix="stence-scorer-")
    try:
        path, lineage = _fetch(uri_or_alias, tmp, uri=uri)
        scorer = load_scorer(path)
        scorer.metadata = scorer_metadata(path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    scorer.source = uri_or_alias
    scorer.lineage = lineage
    return scorer


__all__ = ["LINEAGE_TAGS", "Lineage", "fetch_scorer", "load_champion"]
