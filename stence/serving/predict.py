"""Score new WFDB records with a scorer: one stenosis probability per record, or a clear error per bad one.

Each record goes through exactly what a training example went through: the ingest step (read the leads by
name at whatever rate and order the file has, reject unusable signals, resample to the model rate, ALS
baseline removal) and the evaluation crop (first window of the contract's length, NaN -> 0, clipping,
group-wise z-score). The sampling rate, window and leads come from the model's input contract; the
baseline, clipping and rejection settings from the config stored in the scorer.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from stence.config import DataConfig, IngestConfig
from stence.errors import BadInputError
from stence.serving.scorer import Scorer

UNEXPECTED = "unexpected_error"


@dataclass(frozen=True)
class Preprocessing:
    """Everything that turns a WFDB record into the model's input, resolved from one scorer."""

    fs: float
    n_samples: int
    leads: tuple[str, ...]
    als_lambda: float = DataConfig.als_lambda
    als_p: float = DataConfig.als_p
    als_iter: int = DataConfig.als_iter
    clip_sigma: float = DataConfig.clip_sigma
    min_valid_fraction: float = IngestConfig.min_valid_fraction


def preprocessing_for(scorer: Scorer) -> Preprocessing:
    """The input contract of `scorer` plus the `data`/`ingest` settings of the config stored with it
    (`scorer.metadata`, set by `load_champion`); defaults where a scorer carries no config."""
    spec = scorer.input_spec
    cfg = (getattr(scorer, "metadata", None) or {}).get("config") or {}
    data, ingest = cfg.get("data") or {}, cfg.get("ingest") or {}
    return Preprocessing(
        fs=float(spec["fs"]), n_samples=int(spec["n_samples"]), leads=tuple(spec["leads"]),
        als_lambda=float(data.get("als_lambda", DataConfig.als_lambda)),
        als_p=float(data.get("als_p", DataConfig.als_p)),
        als_iter=int(data.get("als_iter", DataConfig.als_iter)),
        clip_sigma=float(data.get("clip_sigma", DataConfig.clip_sigma)),
        min_valid_fraction=float(ingest.get("min_valid_fraction", IngestConfig.min_valid_fraction)),
    )


def prepare_record(path: str | Path, prep: Preprocessing) -> np.ndarray:
    """WFDB record -> (n_leads, n_samples) float32 model input; raises BadInputError for unusable input."""
    from stence.data.preprocess import crop, deterministic_ecg, normalise_crop
    from stence.data.wfdb_io import read_ecg, validate_signal

    rec = read_ecg(path, prep.leads)  # (12, T) mV at the file's rate, rows in contract order
    validate_signal(rec.signal, prep.min_valid_fraction, prep.leads)
    sig, _ = deterministic_ecg(rec.signal, rec.fs, prep.fs, prep.als_lambda, prep.als_p, prep.als_iter)
    x = crop(sig, prep.n_samples, 0)  # (12, T') -> (12, W): the first window, as in evaluation
    return normalise_crop(x, prep.clip_sigma)


def expand_records(items: Iterable[str | Path]) -> list[Path]:
    """Record arguments -> paths: a folder stands for every `.hea` under it (sorted)."""
    out: list[Path] = []
    for item in items:
        p = Path(item)
        out.extend(sorted(p.rglob("*.hea")) if p.is_dir() else [p])
    return out


def predict_records(model: Scorer | str, paths: Sequence[str | Path], batch_size: int = 32,
                    uri: str | None = None) -> list[dict[str, Any]]:
    """Score each record: `{"record", "probability", "error", "reason"}` in input order.

    `model` is a loaded Scorer or a reference for `load_champion` (models:/..., runs:/..., a file).
    A record that cannot be used gets `probability` None and an `error` saying why (the BadInputError
    reason code and detail); the others are still scored. Multi-label scorers give a list per record.
    """
    from stence.serving.pyfunc import score_batch

    if isinstance(model, str):
        from stence.serving.fetch import load_champion

        model = load_champion(model, uri=uri)
    prep = preprocessing_for(model)
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


__all__ = ["Preprocessing", "expand_records", "predict_records", "prepare_record", "preprocessing_for"]
