"""`stence embed`: ECG embeddings of records under the encoder's own input contract, saved as one .npz file.

The encoder is the configured one (`model.ecg`) or that of a registered model / scorer file, whose stored
contract and config then prepare the records."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from stence.config import Config
from stence.data.limits import Limits
from stence.models.base import ECGEncoder
from stence.models.registry import build_ecg_encoder
from stence.serving.embed import Embeddings, embed_records
from stence.serving.fetch import load_champion
from stence.serving.predict import expand_records
from stence.tracking.client import resolve_tracking_uri


class EmbedRefused(RuntimeError):
    """Nothing was embedded or written: an --out that is an input or exists, or an encoder that did not load."""


@dataclass
class Embedded:
    """Where the embeddings went, every record argument (folders expanded), and the result (its `failed`)."""

    out: Path
    records: list[Path]
    result: Embeddings


def npz_path(out: str | Path) -> Path:
    """`out` with the .npz suffix numpy.savez would give it (so the checks see the file really written)."""
    out = Path(out)
    return out if out.suffix == ".npz" else out.with_name(out.name + ".npz")


def embed_pipeline(cfg: Config, records: Iterable[str | Path], out: str | Path, model_ref: str | None = None,
                   overwrite: bool = False, on_encoder: Callable[[ECGEncoder], None] | None = None) -> Embedded:
    """Embed every record (a folder stands for the records under it) with the configured encoder, or the one
    of `model_ref` (a registered model, run or scorer file), and save them to `out` (.npz). `out` must not be
    one of the records, and an existing file is replaced only with `overwrite`: both are checked before any
    encoder is built (EmbedRefused, nothing written). `on_encoder(encoder)` is called before embedding. A
    record that cannot be used is in `result.failed`; the others are still embedded and saved."""
    out = npz_path(out)
    records = expand_records(records)
    if any(Path(r).resolve() == out.resolve() for r in records):
        raise EmbedRefused(f"--out {out} is one of the inputs; nothing written")
    if out.exists() and not overwrite:
        raise EmbedRefused(f"{out} exists; pass --overwrite to replace it (nothing written)")
    source = None
    if model_ref:
        try:
            source = load_champion(model_ref, uri=resolve_tracking_uri(cfg))
        except Exception as e:  # unknown alias, missing run, unreadable file
            raise EmbedRefused(f"cannot load model {model_ref!r}: {e}") from e
        encoder = source.encoder
    else:
        try:
            encoder = build_ecg_encoder(cfg)
        except (ValueError, FileNotFoundError, OSError) as e:
            raise EmbedRefused(f"cannot build encoder {cfg.model.ecg!r}: {e}") from e
    if on_encoder is not None:
        on_encoder(encoder)
    result = embed_records(encoder, records, limits=Limits.from_config(cfg.ingest), prep_source=source)
    out.parent.mkdir(parents=True, exist_ok=True)
    result.save(out)
    return Embedded(out, records, result)


__all__ = ["EmbedRefused", "Embedded", "embed_pipeline", "npz_path"]
