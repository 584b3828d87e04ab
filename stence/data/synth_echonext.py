"""A synthetic folder in the layout of the PhysioNet EchoNext release.

`echonext_metadata_100k.csv` has one row per ECG (patient_id, ecg_id, split, sex, age_at_ecg and the 12
`_flag` columns in release order); `EchoNext_{split}_waveforms.npy` holds (N, 1, 2500, 12) float32, 10 s
at 250 Hz, baseline-removed and z-scored per lead, row i being the i-th metadata row of that split. As in
the release, `no_split` rows come from val/test patients. Flags derive from a latent structural-heart
score that also shapes the waveform (QRS amplitude and width, T axis, frontal axis), weakly.
"""

from __future__ import annotations

import csv
import dataclasses
from pathlib import Path

import numpy as np
from scipy import signal as sps

from stence.data.synth_ecg import sample_patient, simulate_ecg

ECHONEXT_TASKS = (
    "lvef_lte_45",
    "lvwt_gte_13",
    "aortic_stenosis_moderate_or_greater",
    "aortic_regurgitation_moderate_or_greater",
    "mitral_regurgitation_moderate_or_greater",
    "tricuspid_regurgitation_moderate_or_greater",
    "pulmonary_regurgitation_moderate_or_greater",
    "rv_systolic_dysfunction_moderate_or_greater",
    "pericardial_effusion_moderate_large",
    "pasp_gte_45",
    "tr_max_gte_32",
    "shd_moderate_or_greater",
)
FLAG_COLUMNS = tuple(f"{t}_flag" for t in ECHONEXT_TASKS)
SPLITS = ("train", "val", "test", "no_split")
METADATA_FILE = "echonext_metadata_100k.csv"
FS, N_SAMPLES = 250, 2500
# per-flag (loading on the latent score, threshold): prevalences roughly 5-25 %
_FLAG_MODEL = (
    (1.0, 1.4), (0.8, 1.5), (0.6, 1.8), (0.6, 1.7), (0.8, 1.6), (0.8, 1.6),
    (0.5, 1.8), (0.7, 1.7), (0.5, 1.8), (0.9, 1.4), (0.9, 1.5),
)  # fmt: skip
_HIGHPASS = sps.butter(2, 0.5, btype="highpass", fs=FS, output="sos")  # baseline removal


def waveform_path(root: Path, split: str) -> Path:
    """Path of a split's waveform array."""
    return root / f"EchoNext_{split}_waveforms.npy"


def plan_echonext(n: int, seed: int) -> tuple[list[int], list[str]]:
    """Per ECG row: patient index and split. Patients split 5:1:1; extra ECGs of val/test go no_split."""
    rng = np.random.default_rng([seed, 7_001])
    patients: list[int] = []
    splits: list[str] = []
    block: list[str] = []
    p = 0
    while len(patients) < n:
        if not block:  # blocks of 7 patients keep 5:1:1 train/val/test even in a small release
            block = [str(s) for s in rng.permutation(["train"] * 5 + ["val", "test"])]
        split = block.pop()
        k = int(rng.choice([1, 2, 3, 4], p=[0.4, 0.3, 0.2, 0.1]))
        for j in range(k):
            patients.append(p)
            no_split = split != "train" and j > 0 and rng.random() < 0.7
            splits.append("no_split" if no_split else split)
        p += 1
    # shuffle row order (the release interleaves splits); the arrays follow the metadata order per split
    order = rng.permutation(len(patients))[:n]
    return [patients[i] for i in order], [splits[i] for i in order]


def _unique_ints(rng: np.random.Generator, n: int, low: int, high: int) -> list[int]:
    """n distinct integers in [low, high), in draw order."""
    out: dict[int, None] = {}
    while len(out) < n:
        out.setdefault(int(rng.integers(low, high)), None)
    return list(out)


def _flags(score: float, rng: np.random.Generator) -> list[int]:
    flags = [int(a * score + rng.normal() > t) for a, t in _FLAG_MODEL]
    return flags + [int(any(flags))]  # shd composite


def echonext_row(seed: int, row: int, patient: int, noise: float = 1.0) -> tuple[list[int], np.ndarray]:
    """Flags (12,) and waveform (2500, 12) float32 of metadata row `row` (deterministic)."""
    score = float(np.random.default_rng([seed, 7_003, patient]).normal())
    rng = np.random.default_rng([seed, 7_002, row])
    z = score + float(rng.normal(0.0, 0.3))
    flags = _flags(z, rng)
    return flags, _waveform(z, flags, rng, noise)


def _waveform(score: float, flags: list[int], rng: np.random.Generator, noise: float) -> np.ndarray:
    """One ECG as the release stores it: (2500, 12) float32, baseline-removed, z-scored per lead."""
    p = sample_patient(rng, {})
    f = dict(zip(ECHONEXT_TASKS, flags, strict=True))
    p = dataclasses.replace(
        p,
        r_amp=p.r_amp * (1.15 if f["lvwt_gte_13"] else 1.0) * (0.9 if f["lvef_lte_45"] else 1.0),
        qrs_width=p.qrs_width * (1.12 if f["lvef_lte_45"] else 1.0),
        t_amp=p.t_amp * (0.7 if f["pericardial_effusion_moderate_large"] else 1.0),
        t_axis_deg=p.t_axis_deg
        + (30.0 if f["lvwt_gte_13"] or f["aortic_stenosis_moderate_or_greater"] else 0.0),
        axis_deg=p.axis_deg + (20.0 if f["pasp_gte_45"] or f["tr_max_gte_32"] else 0.0) + 3.0 * score,
    )
    sig = simulate_ecg(p, FS, N_SAMPLES / FS, rng, noise=noise).signal  # (12, 2500)
    sig = sps.sosfiltfilt(_HIGHPASS, sig, axis=1)
    sd = sig.std(axis=1, keepdims=True)
    sig = np.clip(sig, sig.mean(axis=1, keepdims=True) - 4 * sd, sig.mean(axis=1, keepdims=True) + 4 * sd)
    sig = (sig - sig.mean(axis=1, keepdims=True)) / (sig.std(axis=1, keepdims=True) + 1e-8)
    return sig.T.astype(np.float32)  # (12, T) -> (T, 12)


def _open_array(path: Path, rows: int) -> np.ndarray:
    """A (rows, 1, 2500, 12) float32 .npy filled in place (memory-mapped; the train array can be large)."""
    if rows == 0:
        np.save(path, np.zeros((0, 1, N_SAMPLES, 12), np.float32))
        return np.zeros((0, 1, N_SAMPLES, 12), np.float32)
    return np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(rows, 1, N_SAMPLES, 12))


def write_echonext(root: Path, n: int, seed: int, noise: float = 1.0) -> dict[str, int]:
    """Write n ECGs in the EchoNext layout under `root`; returns the row count per split."""
    root.mkdir(parents=True, exist_ok=True)
    patients, splits = plan_echonext(n, seed)
    n_patients = max(patients, default=-1) + 1
    rng = np.random.default_rng([seed, 7_004])
    ids = _unique_ints(rng, n_patients, 10_000_000, 100_000_000)
    sex = rng.choice(["M", "F"], size=n_patients)
    age = rng.integers(25, 90, n_patients)
    counts = {s: splits.count(s) for s in SPLITS}
    arrays = {s: _open_array(waveform_path(root, s), c) for s, c in counts.items()}
    cursor = dict.fromkeys(SPLITS, 0)
    with open(root / METADATA_FILE, "w", newline="") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(["patient_id", "ecg_id", "split", "sex", "age_at_ecg", *FLAG_COLUMNS])
        for i, (pat, split) in enumerate(zip(patients, splits, strict=True)):
            flags, wave = echonext_row(seed, i, pat, noise)
            arrays[split][cursor[split], 0] = wave
            cursor[split] += 1
            w.writerow([f"EN{ids[pat]}", f"ENX{i:06d}", split, sex[pat], int(age[pat]), *flags])
    for a in arrays.values():
        if isinstance(a, np.memmap):
            a.flush()
    del arrays
    return counts


__all__ = [
    "ECHONEXT_TASKS",
    "FLAG_COLUMNS",
    "METADATA_FILE",
    "SPLITS",
    "echonext_row",
    "plan_echonext",
    "waveform_path",
    "write_echonext",
]
