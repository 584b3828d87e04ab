"""Embeddings of ECG records under an encoder's own input contract (`stence embed`).

Each record goes through `prepare_record` (the one contract function, the first window) and the encoder in
eval mode; a record that cannot be used gets an error instead, and the others are still embedded.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from stence.data.limits import Limits
from stence.errors import BadInputError
from stence.models.base import ECGEncoder
from stence.serving.predict import UNEXPECTED, prepare_record, preprocessing_for


@dataclass
class Embeddings:
    """What `embed_records` returns: one row per usable record, one (record, reason, error) per other."""

    embeddings: np.ndarray  # (N, D) float32
    records: list[str]
    contract: dict
    failed: list[tuple[str, str, str]] = field(default_factory=list)

    def save(self, path: Path) -> None:
        """npz readable with allow_pickle=False: embeddings, records, contract (JSON), failed_* arrays."""
        fixed = {
            "embeddings": self.embeddings.astype(np.float32),
            "records": np.array(self.records, dtype=str),
            "contract": np.array(json.dumps(self.contract, sort_keys=True)),
            "failed_records": np.array([f[0] for f in self.failed], dtype=str),
            "failed_reasons": np.array([f[1] for f in self.failed], dtype=str),
        }
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez(tmp, **fixed)
        tmp.replace(path)


@torch.no_grad()
def embed_records(encoder: ECGEncoder, paths: Sequence[str | Path], limits: Limits | None = None,
                  batch_size: int = 32, prep_source: object | None = None) -> Embeddings:
    """Embed each record with `encoder` (eval mode, float32) under its input contract.

    `prep_source` is what carries the contract and config (a loaded scorer); default the encoder itself."""
    prep = preprocessing_for(prep_source if prep_source is not None else encoder, limits)
    encoder = encoder.eval()
    ready: list[tuple[str, np.ndarray]] = []
    failed: list[tuple[str, str, str]] = []
    for path in paths:
        try:
            ready.append((str(path), prepare_record(path, prep)))
        except BadInputError as e:
            failed.append((str(path), e.reason, str(e)))
        except Exception as e:  # one broken file must not stop the others
            failed.append((str(path), UNEXPECTED, f"{UNEXPECTED}: {type(e).__name__}: {e}"))
    chunks = []
    for i in range(0, len(ready), batch_size):
        x = torch.from_numpy(np.stack([a for _, a in ready[i : i + batch_size]]))  # (B, 12, W)
        chunks.append(encoder(x).float().numpy())  # (B, D)
    emb = np.concatenate(chunks) if chunks else np.zeros((0, encoder.embed_dim), np.float32)
    return Embeddings(emb, [r for r, _ in ready], prep.contract.to_dict(), failed)


__all__ = ["Embeddings", "embed_records"]
