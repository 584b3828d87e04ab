"""`stence predict`: load a registered model (or a scorer file) and score ECG records with it, each record read
at its own rate and lead order and prepared by the model's input contract, as in evaluation."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stence.config import Config
from stence.data.limits import Limits
from stence.models.scorer import Scorer
from stence.serving.fetch import load_champion
from stence.serving.predict import expand_records, predict_records
from stence.tracking.client import resolve_tracking_uri


class ModelNotLoaded(RuntimeError):
    """The model reference could not be loaded (unknown alias, missing run, unreadable file, no permission)."""

    def __init__(self, ref: str, uri: str, cause: BaseException):
        super().__init__(f"cannot load model {ref!r} from {uri}: {cause}")
        self.ref, self.uri, self.cause = ref, uri, cause


@dataclass
class Scored:
    """What scored (`ref`, the loaded Scorer with its `lineage`) and one row per record argument:
    {"record", "probability", "error", "reason"}."""

    ref: str
    model: Scorer
    rows: list[dict[str, Any]] = field(default_factory=list)

    @property
    def n_ok(self) -> int:
        return sum(r["error"] is None for r in self.rows)


def default_model_ref(cfg: Config) -> str:
    """The champion of the configured registered model: `models:/<tracking.registered_model>@champion`."""
    return f"models:/{cfg.tracking.registered_model}@champion"


def score_records(cfg: Config, records: Iterable[str | Path], model_ref: str | None = None,
                  on_loaded: Callable[[Scorer], None] | None = None) -> Scored:
    """Load `model_ref` (default `default_model_ref`) from the configured tracking store, call
    `on_loaded(model)` (before any record is read), and score every record; a folder stands for the records
    under it (an empty one stays an argument of its own, so it gets an error row rather than vanishing).
    Records over the ingest limits (`cfg.ingest`) get an error row too. Raises ModelNotLoaded."""
    ref = model_ref or default_model_ref(cfg)
    uri = resolve_tracking_uri(cfg)
    try:
        model = load_champion(ref, uri=uri)
    except Exception as e:  # unknown alias, missing run, unreadable file: the caller says which and what to do
        raise ModelNotLoaded(ref, uri, e) from e
    if on_loaded is not None:
        on_loaded(model)
    rows = predict_records(model, expand_records(records), limits=Limits.from_config(cfg.ingest))
    return Scored(ref, model, rows)


__all__ = ["ModelNotLoaded", "Scored", "default_model_ref", "score_records"]
