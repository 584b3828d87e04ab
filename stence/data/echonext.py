"""Reader for the PhysioNet EchoNext release layout (memory-mapped waveforms, metadata CSV, 12 flags).

  echonext_metadata_100k.csv        one row per ECG, `split` in train / val / test / no_split, `*_flag` columns
  EchoNext_{split}_waveforms.npy    (N, 1, 2500, 12): 10 s at 250 Hz, standard lead order, already
                                    baseline-removed, clipped and z-scored per lead (no baseline fit here)
Row i of a split's array is the i-th metadata row with that split.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from stence.config import DataConfig
from stence.data.contract import InputContract, project_contract
from stence.data.contract_apply import record_part, window_part
from stence.data.datasets import _EpochSeeded
from stence.data.preprocess import random_start

ECHONEXT_FS = 250
ECHONEXT_TASKS = (
    "lvef_lte_45_flag",
    "lvwt_gte_13_flag",
    "aortic_stenosis_moderate_or_greater_flag",
    "aortic_regurgitation_moderate_or_greater_flag",
    "mitral_regurgitation_moderate_or_greater_flag",
    "tricuspid_regurgitation_moderate_or_greater_flag",
    "pulmonary_regurgitation_moderate_or_greater_flag",
    "rv_systolic_dysfunction_moderate_or_greater_flag",
    "pericardial_effusion_moderate_large_flag",
    "pasp_gte_45_flag",
    "tr_max_gte_32_flag",
    "shd_moderate_or_greater_flag",
)
METADATA = "echonext_metadata_100k.csv"


class EchoNextDataset(_EpochSeeded):
    """One split of EchoNext as (ecg (12, W) at the model rate, labels (12,) with NaN for missing)."""

    def __init__(self, root: str | Path, split: str, cfg: DataConfig, train: bool = False, seed: int = 0,
                 allow_no_split: bool = False, contract: InputContract | None = None):
        if split not in ("train", "val", "test", "no_split"):
            raise ValueError(f"unknown EchoNext split {split!r}: use train, val, test (or no_split)")
        if split == "no_split" and not allow_no_split:
            raise ValueError("no_split shares patients with val/test: it is never used when evaluating on them "
                             "(pass allow_no_split=True only for pretraining that is not evaluated on val/test)")
        root = Path(root)
        meta = pd.read_csv(root / METADATA)
        missing = [t for t in ECHONEXT_TASKS if t not in meta.columns] + [c for c in ("split",) if c not in meta]
        if missing:
            raise ValueError(f"{root / METADATA} lacks column(s) {missing}")
        self.meta = meta[meta["split"] == split].reset_index(drop=True)
        self.waves = np.load(root / f"EchoNext_{split}_waveforms.npy", mmap_mode="r")  # (N, 1, 2500, 12)
        if self.waves.shape[0] != len(self.meta) or self.waves.shape[1:] != (1, 2500, 12):
            raise ValueError(
                f"EchoNext_{split}_waveforms.npy has shape {self.waves.shape}; expected "
                f"({len(self.meta)}, 1, 2500, 12) to match the metadata rows of split {split!r}"
            )
        self.labels = self.meta[list(ECHONEXT_TASKS)].to_numpy(np.float32)  # (N, 12), NaN = unknown
        self.patients = self.meta["patient_id"].astype(str).to_numpy() if "patient_id" in self.meta else None
        self.cfg, self.train, self.seed = cfg, train, seed
        self.contract = contract if contract is not None else project_contract(cfg)
        # EchoNext is distributed filtered and baseline-corrected: its records skip the baseline step only
        self._record_contract = replace(self.contract, baseline="none")

    def __len__(self) -> int:
        return len(self.meta)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        x = np.asarray(self.waves[i, 0], dtype=np.float32).T  # (2500, 12) -> (12, 2500)
        x = record_part(x, ECHONEXT_FS, self._record_contract)  # (12, T') at the contract's rate
        start = random_start(x.shape[1], self.contract.n_samples, self._rng(i)) if self.train else 0
        x = window_part(x, self.contract, start)
        return {"ecg": torch.from_numpy(x.astype(np.float32)), "label": torch.from_numpy(self.labels[i]),
                "index": torch.tensor(i)}
