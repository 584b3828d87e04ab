"""Cached angiography patch features: one memmap per (cohort, frame encoder, preprocessing) key.

  COHORT/features/<key>/feats.npy   (n_views, variants, P, F) float16; variant 0 is unaugmented
  COHORT/features/<key>/meta.json   the key's ingredients, written last (its presence = complete)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np


@dataclass
class FeatureStore:
    root: Path  # COHORT/features/<key>

    @classmethod
    def open(cls, root: str | Path) -> FeatureStore:
        root = Path(root)
        if not (root / "meta.json").exists():
            raise FileNotFoundError(f"no complete feature cache at {root}; run `stence features COHORT`")
        return cls(root)

    @cached_property
    def meta(self) -> dict:
        return json.loads((self.root / "meta.json").read_text())

    @cached_property
    def feats(self) -> np.ndarray:
        return np.load(self.root / "feats.npy", mmap_mode="r")  # (n_views, variants, P, F)

    @property
    def n_variants(self) -> int:
        return int(self.feats.shape[1])

    def get(self, view_rows: np.ndarray, variant: int) -> np.ndarray:
        """(V,) view rows -> (V, P, F) float32 features of one variant."""
        return np.asarray(self.feats[view_rows, variant], dtype=np.float32)

    def __getstate__(self) -> dict:
        return {"root": self.root}

    def __setstate__(self, state: dict) -> None:
        self.root = state["root"]
