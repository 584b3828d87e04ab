"""Score new ECG records (WFDB or vendor exports) with a scorer: one stenosis probability per record, or a clear error per bad one.

Each record goes through exactly what a training example went through: read the leads by name at whatever
rate and order the file has, reject unusable signals, then the model's input contract
(stence/data/contract.py) with its first window, as in evaluation. The contract comes from the scorer; the
rejection setting from the config stored in it; the per-file limits (`stence.data.limits.Limits`, the
`ingest.*` keys) from the caller, so that an operator can raise them.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from stence.config import IngestConfig
from stence.data.contract import InputContract, contract_of_spec
from stence.data.contract_apply import apply_contract
from stence.data.ecg_formats import read_ecg_file, sniff
from stence.data.limits import Limits
from stence.data.wfdb_io import validate_signal
from stence.errors import BadInputError
from stence.models.scorer import Scorer
from stence.serving.fetch import load_champion
from stence.serving.pyfunc import score_batch

UNEXPECTED = "unexpected_error"
NO_RECORDS = "no_records"  # a folder argument with no ECG record (WFDB header or vendor export) under it


@dataclass(frozen=True)
class Preprocessing:
    """Everything that turns a recorded ECG into the model's input, resolved from one scorer or encoder."""

    contract: InputContract  # the encoder's input contract (stence/data/contract.py)
    min_valid_fraction: float = IngestConfig.min_valid_fraction
    limits: Limits = field(default_factory=Limits)  # refused before decoding: rate, duration, size


def preprocessing_for(model: Any, limits: Limits | None = None) -> Preprocessing:
    """The input contract of `model` (a Scorer or an ECG encoder) and the rejection setting of the config
    stored with it (`scorer.metadata`, set by `load_champion`); a scorer written before contracts existed
    gets the project contract of its rate and window with its config's `data.*` settings.

    `limits` (default `Limits()`) are the reader's safety bounds, not a property of the model: they come
    from the caller's config (`Limits.from_config(cfg.ingest)`), never from the model."""
    cfg = (getattr(model, "metadata", None) or {}).get("config") or {}
    ingest = cfg.get("ingest") or {}
    return Preprocessing(
        contract=contract_of_spec(model.input_spec, cfg),
        min_valid_fraction=float(ingest.get("min_valid_fraction", IngestConfig.min_valid_fraction)),
        limits=limits or Limits(),
    )


def prepare_record(path: str | Path, prep: Preprocessing) -> np.ndarray:
    """ECG record -> (n_leads, n_samples) float32 model input under the contract; raises BadInputError for
    unusable input (a folder, a record over `prep.limits`, a bad header or signal)."""
    if Path(path).is_dir():
        raise _folder_error(Path(path))
    c = prep.contract
    rec = read_ecg_file(path, c.leads, prep.limits)  # (12, T) mV at the file's rate, rows in contract order
    validate_signal(rec.signal, prep.min_valid_fraction, c.leads)
    return apply_contract(rec.signal, rec.fs, c)  # the first window, as in evaluation


def _records_under(folder: Path) -> list[Path]:
    """Every ECG record under `folder`, sorted: WFDB headers and vendor exports recognised by content (rglob
    does not follow folder links: no cycles). WFDB signal files and anything else are not records."""
    out = []
    for p in sorted(folder.rglob("*")):
        if p.is_file() and (p.suffix.lower() == ".hea" or sniff(p) not in (None, "wfdb")):
            out.append(p)
    return out


def _folder_error(folder: Path) -> BadInputError:
    """Why a folder cannot be scored as a record: it holds none, or its records must be named."""
    if not _records_under(folder):
        return BadInputError(NO_RECORDS, "is a directory with no ECG records (WFDB .hea files or vendor ECG "
                                         "exports) under it")
    return BadInputError(NO_RECORDS, "is a directory: pass its records, e.g. DIR/*.hea (`stence predict` "
                                     "expands folders itself)")


def expand_records(items: Iterable[str | Path]) -> list[Path]:
    """Record arguments -> paths: a folder stands for every ECG record under it (WFDB headers and vendor
    exports, sorted, recursively).

    A folder with none stays in the list as itself, so that scoring reports it (NO_RECORDS) instead of
    dropping the argument without a word.
    """
    out: list[Path] = []
    for item in items:
        p = Path(item)
        out.extend((_records_under(p) or [p]) if p.is_dir() else [p])
    return out


def predict_records(model: Scorer | str, paths: Sequence[str | Path], batch_size: int = 32,
                    uri: str | None = None, limits: Limits | None = None) -> list[dict[str, Any]]:
    """Score each record: `{"record", "probability", "error", "reason"}` in input order, one row per path.

    `model` is a loaded Scorer or a reference for `load_champion` (models:/..., runs:/..., a file).
    A record that cannot be used (over `limits`, default `Limits()`; a folder; a bad header or signal) gets
    `probability` None and an `error` saying why (the BadInputError reason code and detail); the others
    are still scored. Multi-label scorers give a list per record.
    """
    if isinstance(model, str):
        model = load_champion(model, uri=uri)
    prep = preprocessing_for(model, limits)
    rows: list[dict[str, Any]] = []
    ready: list[tuple[int, np.ndarray]] = []
    for path in paths:
        row: dict[str, Any] = {"record": str(path), "probability": None, "error": None, "reason": None}
        try:
            ready.append((len(rows), prepare_record(path, prep)))
        except BadInputError as e:
            row.update(error=str(e), reason=e.reason)
        except Exception as e:  # one broken file must not stop the others
            row.update(error=f"{UNEXPECTED}: {type(e).__name__}: {e}", reason=UNEXPECTED)
        rows.append(row)
    if ready:
        x = np.stack([arr for _, arr in ready])  # (N, 12, W)
        probs = score_batch(model, x, batch_size=batch_size).to_numpy()  # (N, n_out)
        for (i, _), p in zip(ready, probs, strict=True):
            rows[i]["probability"] = float(p[0]) if p.shape[0] == 1 else [float(v) for v in p]
    return rows


__all__ = ["NO_RECORDS", "Preprocessing", "expand_records", "predict_records", "prepare_record", "preprocessing_for"]
