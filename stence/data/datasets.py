"""Training-time datasets over the ingested caches: crops, normalisation and augmentation at access time.

Every item is a dict of tensors; collate functions pad studies to the largest view count with a mask.
Randomness is drawn from `np.random.default_rng([seed, epoch, index])`, so an epoch is reproducible
whatever the number of loader workers; call `set_epoch` each epoch (as with a DistributedSampler).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from stence.config import DataConfig
from stence.data.augment import augment_ecg, drop_views
from stence.data.cohort_io import Cohort
from stence.data.contract import InputContract, project_contract
from stence.data.contract_apply import window_part
from stence.data.contract_cache import contract_signals
from stence.data.feature_store import FeatureStore
from stence.data.frame_augment import augment_frames, random_affine
from stence.data.labels import TARGET_NAMES, threshold_labels
from stence.data.preprocess import random_start


class _EpochSeeded(Dataset):
    seed: int = 0
    epoch: int = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _rng(self, index: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.epoch, int(index)])


def ecg_window(sig: np.ndarray, contract: InputContract, cfg: DataConfig, train: bool,
               rng: np.random.Generator) -> np.ndarray:
    """(12, T) cached record under `contract` -> (12, W) model input: a random window in training (then the
    paper's augmentations if `cfg.augment`), the first one otherwise."""
    start = random_start(sig.shape[1], contract.n_samples, rng) if train else 0
    x = window_part(sig, contract, start)  # (12, W)
    if train and cfg.augment:
        x = augment_ecg(x, int(contract.fs), rng)
    return x.astype(np.float32, copy=False)


def _contract_for(cohort: Cohort, cfg: DataConfig, contract: InputContract | None) -> InputContract:
    """The encoder's contract, or the project contract of `cfg` (what ingest cached) when none is given."""
    return contract if contract is not None else project_contract(cfg)


class PairedDataset(_EpochSeeded):
    """(ECG, angiography study) pairs of one split. Angiography comes from cached patch features when a
    FeatureStore is given ("angio_feats" (V, P, F)), else from cached key frames ("frames" (V, K, S, S))."""

    def __init__(self, cohort: Cohort, split: str, cfg: DataConfig, features: FeatureStore | None = None,
                 train: bool = False, seed: int = 0, contract: InputContract | None = None):
        self.cohort, self.cfg, self.features, self.train, self.seed = cohort, cfg, features, train, seed
        m = cohort.manifest
        self.rows = m[m["split"] == split].reset_index(drop=True)
        if not len(self.rows):
            raise ValueError(f"split {split!r} of {cohort.root} has no pairs")
        self.targets = self.rows[[f"t_{n}" for n in TARGET_NAMES]].to_numpy(np.float32).copy()  # (N, 11)
        views = cohort.views
        self.angles = np.nan_to_num(views[["primary_angle", "secondary_angle"]].to_numpy(np.float32))  # (Nv, 2)
        self.view_rows = cohort.views_of_study
        self.contract = _contract_for(cohort, cfg, contract)
        self.signals = contract_signals(cohort, self.contract)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        rng = self._rng(i)
        r = self.rows.iloc[i]
        ecg = ecg_window(self.signals.signal(r["ecg_id"]), self.contract, self.cfg, self.train, rng)
        vrows = self.view_rows[r["study_id"]]
        if self.train and self.cfg.view_drop_max > 0:
            vrows = vrows[drop_views(len(vrows), self.cfg.view_drop_max, rng)]
        item = {
            "ecg": torch.from_numpy(ecg),  # (12, W)
            "angles": torch.from_numpy(self.angles[vrows]),  # (V, 2)
            "targets": torch.from_numpy(self.targets[i]),  # (11,)
            "max_stenosis": torch.tensor(float(r["max_stenosis"])),
            "index": torch.tensor(i),
        }
        if self.features is not None:
            variant = int(rng.integers(self.features.n_variants)) if self.train else 0
            item["angio_feats"] = torch.from_numpy(self.features.get(vrows, variant))  # (V, P, F)
        else:
            item["frames"] = torch.from_numpy(np.asarray(self.cohort.frame_cache[vrows], np.float32))  # (V,K,S,S)
        return item


def collate_paired(batch: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack fixed-size fields; pad the view axis to the largest study with `view_mask` (True = real view)."""
    out: dict[str, torch.Tensor] = {}
    n_views = [b["angles"].shape[0] for b in batch]
    v_max = max(n_views)
    for key in batch[0]:
        vals = [b[key] for b in batch]
        if key in ("angio_feats", "frames", "angles"):
            padded = vals[0].new_zeros((len(vals), v_max) + tuple(vals[0].shape[1:]))  # (B, V, ...)
            for j, v in enumerate(vals):
                padded[j, : v.shape[0]] = v
            out[key] = padded
        else:
            out[key] = torch.stack(vals)
    out["view_mask"] = torch.arange(v_max)[None, :] < torch.tensor(n_views)[:, None]  # (B, V)
    return out


class EcgDataset(_EpochSeeded):
    """ECG-only samples of one split for a threshold task; the label of an ECG is its patient's maximum
    stenosis degree. `fraction` < 1 takes a seeded subset stratified on the label."""

    def __init__(self, cohort: Cohort, split: str, cfg: DataConfig, task: str, train: bool = False,
                 seed: int = 0, fraction: float = 1.0, contract: InputContract | None = None):
        self.cohort, self.cfg, self.train, self.seed = cohort, cfg, train, seed
        m = cohort.manifest
        m = m[m["split"] == split]
        patient_max = m.groupby("patient")["max_stenosis"].max()
        rows = m.drop_duplicates("ecg_id")[["ecg_id", "patient", "age", "sex"]].copy()
        rows["max_stenosis"] = rows["patient"].map(patient_max)
        keep, y = threshold_labels(rows["max_stenosis"].to_numpy(), task)
        rows = rows[keep].assign(label=y).sort_values("ecg_id").reset_index(drop=True)
        if fraction < 1.0:
            rows = stratified_subset(rows, fraction, seed)
        if not len(rows):
            raise ValueError(f"split {split!r} has no ECGs for task {task!r}")
        self.rows = rows
        self.labels = rows["label"].to_numpy(np.float32)
        self.patients = rows["patient"].to_numpy()
        self.contract = _contract_for(cohort, cfg, contract)
        self.signals = contract_signals(cohort, self.contract)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        r = self.rows.iloc[i]
        ecg = ecg_window(self.signals.signal(r["ecg_id"]), self.contract, self.cfg, self.train, self._rng(i))
        return {"ecg": torch.from_numpy(ecg), "label": torch.tensor([self.labels[i]]), "index": torch.tensor(i)}


def stratified_subset(rows: pd.DataFrame, fraction: float, seed: int) -> pd.DataFrame:
    """Seeded subset keeping `fraction` of each label (at least one per label), not a prefix."""
    rng = np.random.default_rng(seed)
    parts = []
    for _, g in rows.groupby("label"):
        k = max(1, int(round(fraction * len(g))))
        parts.append(g.iloc[np.sort(rng.choice(len(g), size=k, replace=False))])
    return pd.concat(parts).sort_values("ecg_id").reset_index(drop=True)


class StudyDataset(_EpochSeeded):
    """Angiography studies of one split (stage A): each study once, with its 11 targets.

    With a FeatureStore, "angio_feats" (V, P, F) (training: a random cached variant, else variant 0).
    Without one (stage A trained end to end), "frames" (V, S, S): the key frame each view's encoder sees,
    key frame 0 in evaluation (what `stence features` encodes); in training a random key frame, rotated by
    up to `rotate_deg` degrees (with a small scale and shift, 0 = none) and then given the feature cache's
    intensity/translation augmentation when `augment_frames` is set.
    """

    def __init__(self, cohort: Cohort, split: str, cfg: DataConfig, features: FeatureStore | None = None,
                 train: bool = False, seed: int = 0, augment_frames: bool = True, rotate_deg: float = 0.0):
        self.cohort, self.cfg, self.features, self.train, self.seed = cohort, cfg, features, train, seed
        self.augment_frames, self.rotate_deg = augment_frames, rotate_deg
        st = cohort.studies
        self.rows = st[st["split"] == split].reset_index(drop=True)
        if not len(self.rows):
            raise ValueError(f"split {split!r} of {cohort.root} has no studies")
        self.targets = self.rows[[f"t_{n}" for n in TARGET_NAMES]].to_numpy(np.float32, copy=True)  # (N, 11), writable
        self.angles = np.nan_to_num(cohort.views[["primary_angle", "secondary_angle"]].to_numpy(np.float32))
        self.view_rows = cohort.views_of_study

    def __len__(self) -> int:
        return len(self.rows)

    def _frames(self, vrows: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """(V,) view rows -> (V, S, S) float32 key frames (augmented in training)."""
        cache = self.cohort.frame_cache  # (n_views, K, S, S)
        if not self.train:
            return np.asarray(cache[vrows, 0], np.float32)
        k = rng.integers(cache.shape[1], size=len(vrows))
        frames = np.stack([np.asarray(cache[r, j], np.float32) for r, j in zip(vrows, k, strict=True)])
        if self.augment_frames:
            if self.rotate_deg > 0:
                frames = np.stack([random_affine(f, rng, self.rotate_deg) for f in frames])
            frames = np.stack([augment_frames(f[None], rng)[0] for f in frames])
        return frames

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        rng = self._rng(i)
        vrows = self.view_rows[self.rows["study_id"].iloc[i]]
        if self.train and self.cfg.view_drop_max > 0:
            vrows = vrows[drop_views(len(vrows), self.cfg.view_drop_max, rng)]
        item = {"angles": torch.from_numpy(self.angles[vrows]), "targets": torch.from_numpy(self.targets[i]),
                "max_stenosis": torch.tensor(float(self.rows["max_stenosis"].iloc[i])), "index": torch.tensor(i)}
        if self.features is not None:
            variant = int(rng.integers(self.features.n_variants)) if self.train else 0
            item["angio_feats"] = torch.from_numpy(self.features.get(vrows, variant))  # (V, P, F)
        else:
            item["frames"] = torch.from_numpy(self._frames(vrows, rng))  # (V, S, S)
        return item
