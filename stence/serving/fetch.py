"""Load a scorer back from MLflow: an alias (`models:/NAME@champion`), a version, a logged model, a run,
or a local file; always from the weights-only scorer file (no model code is unpickled)."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

from stence.outputs import claim_output
from stence.serving.registry import SCORER_FILE, _client, _global_tracking_uri, _uri
from stence.serving.scorer import Scorer, load_scorer, scorer_metadata

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
    import mlflow.artifacts

    local = Path(ref).expanduser()
    if local.exists():
        return _find_scorer(local)
    tracking = _uri(uri)
    if not ref.startswith(("models:/", "runs:/")):
        if "@" in ref and "/" not in ref:  # NAME@ALIAS shorthand
            ref = f"models:/{ref}"
        elif len(ref) == 32 and all(c in "0123456789abcdef" for c in ref):  # a run id
            ref = f"runs:/{ref}"
        else:
            raise FileNotFoundError(f"{ref!r} is neither a file nor a models:/ or runs:/ URI")
    if ref.startswith("runs:/"):
        ref = _resolve_run_ref(_client(uri), ref)
    claim_output(dst, FETCHED_KIND, overwrite=True)  # ours (re-fetched) or new; never a folder stence did not write
    with _global_tracking_uri(tracking):  # models:/ resolution ignores the explicit URIs in places
        out = mlflow.artifacts.download_artifacts(artifact_uri=ref, dst_path=str(dst), tracking_uri=tracking,
                                                  registry_uri=tracking)
    return _find_scorer(Path(out))


def load_champion(uri_or_alias: str, *, uri: str | None = None) -> Scorer:
    """The Scorer behind an alias, version, run or file (see `fetch_scorer`), rebuilt from the weights-only
    scorer file (no model code is unpickled). `scorer.metadata` holds its task, input contract, config and
    metrics; `scorer.source` the reference it came from."""
    tmp = tempfile.mkdtemp(prefix="stence-scorer-")
    try:
        path = fetch_scorer(uri_or_alias, tmp, uri=uri)
        scorer = load_scorer(path)
        scorer.metadata = scorer_metadata(path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    scorer.source = uri_or_alias
    return scorer


__all__ = ["fetch_scorer", "load_champion"]
