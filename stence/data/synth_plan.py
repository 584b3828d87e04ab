"""The synthetic cohort's plan: what `stence synth` writes (`SynthConfig`), its patients, their ECG records and
angiography studies, each drawn from a generator keyed by (seed, stream, patient, item), so the same seed gives
the same cohort. stence/data/synth.py writes a whole cohort from it; synth_corrupt plants corrupt files."""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from stence.config import STANDARD_LEADS
from stence.data.labels import MAJOR_SEGMENTS, SEGMENTS
from stence.data.synth_angio import View, render_view, sample_tree, standard_views
from stence.data.synth_dicom import COMPRESSIONS, XaMeta, make_uid, write_xa
from stence.data.synth_ecg import sample_patient, simulate_ecg
from stence.data.synth_records import FIRST_NAMES_F, FIRST_NAMES_M, LAST_NAMES, EcgRecord, Patient
from stence.data.synth_vendor import ECG_FORMATS, ECG_GAIN, age_on

MAX_DEGREE_LEVELS = (0, 50, 70, 90, 99, 100)  # balanced over patients: every threshold task has 2 classes
MINOR_DEGREES = (30, 40, 50, 60)
NAN_DIGITAL = -32768  # WFDB invalid-sample value of format 16, read back as NaN
PAIR_JITTER_DAYS = 20  # good ECGs lie within +/- this many days of the study (pairing window is 30)
SHUFFLED_LEAD_FRACTION = 0.2
# random streams (second key of every generator)
_S_PATIENT, _S_ECG, _S_TREE, _S_VIEW, _S_STUDY = 1, 2, 3, 4, 5


@dataclass(frozen=True)
class SynthConfig:
    """What `stence synth` writes. Presets: `SynthConfig.preset("tiny" | "demo" | "bench")`."""

    patients: int = 60  # patients, one angiography study each
    ecgs_per_patient: int = 2  # good ECGs per patient, all within +/- 20 days of the study
    views: int = 3  # DICOM views (cine runs) per study
    frames: int = 6  # frames per view
    image_size: int = 64  # frame rows = columns, pixels
    fs: tuple[int, ...] = (500,)  # sampling rates; each record picks one (seeded)
    duration_s: float = 10.0  # ECG length, seconds
    ecg_effect: float = 1.0  # strength of the stenosis effect on the ECG (0 = none)
    noise: float = 1.0  # noise level of ECGs and frames (0 = clean)
    corrupt_fraction: float = 0.0  # planted corrupt files, relative to the good ones (see synth_corrupt)
    compression: str = "none"  # DICOM transfer syntax: "none" (explicit VR little endian) or "rle"
    echonext: int = 0  # ECGs in an EchoNext-format folder (0 = none)
    ecg_format: str = "wfdb"  # ECG files: wfdb, muse, hl7, dicom, or mixed (one drawn per record, seeded)
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "fs", tuple(int(f) for f in self.fs))  # accept lists (YAML, CLI)
        if self.patients < 1 or self.ecgs_per_patient < 1 or self.views < 1 or self.frames < 1:
            raise ValueError("patients, ecgs_per_patient, views and frames must be >= 1")
        if self.image_size < 16:
            raise ValueError(f"image_size {self.image_size}: need >= 16 pixels")
        if not self.fs or any(f <= 0 for f in self.fs):
            raise ValueError(f"fs {self.fs}: need one or more positive rates")
        if self.ecg_format not in ECG_FORMATS:
            raise ValueError(f"ecg_format {self.ecg_format!r}: use one of {ECG_FORMATS}")
        if self.compression not in COMPRESSIONS:
            raise ValueError(f"compression {self.compression!r}: use one of {COMPRESSIONS}")
        if not 0.0 <= self.corrupt_fraction <= 1.0:
            raise ValueError(f"corrupt_fraction {self.corrupt_fraction}: need 0..1")
        if self.duration_s <= 1.0 or self.echonext < 0:
            raise ValueError("duration_s must exceed 1 s and echonext must be >= 0")

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> SynthConfig:
        """Named size: "tiny" (tests, seconds), "demo" (the default demo), "bench" (benchmarks)."""
        presets: dict[str, dict[str, Any]] = {
            "tiny": dict(patients=16, ecgs_per_patient=2, views=2, frames=4),
            "demo": dict(patients=120, ecgs_per_patient=2, views=3, frames=6, echonext=400),
            "bench": dict(
                patients=1000, ecgs_per_patient=3, views=4, frames=8, image_size=128, echonext=4000
            ),
        }
        if name not in presets:
            raise ValueError(f"unknown size {name!r}: use one of {sorted(presets)}")
        return cls(**{**presets[name], **overrides})


def rng_for(seed: int, *keys: int) -> np.random.Generator:
    """A generator keyed by (seed, stream, item ...): independent of how many other items exist."""
    return np.random.default_rng([seed, *keys])


def _unique_ids(rng: np.random.Generator, n: int) -> list[str]:
    out: dict[str, None] = {}
    while len(out) < n:
        out.setdefault(f"{int(rng.integers(10_000_000, 100_000_000))}", None)
    return list(out)


def _segments(max_deg: int, rng: np.random.Generator) -> dict[int, int]:
    """Segment degrees for a patient maximum: one main lesion (major segments likelier) + minor ones."""
    seg = dict.fromkeys(SEGMENTS, 0)
    if max_deg == 0:
        return seg
    weights = np.array([2.0 if s in MAJOR_SEGMENTS else 1.0 for s in SEGMENTS])
    main = int(rng.choice(SEGMENTS, p=weights / weights.sum()))
    seg[main] = max_deg
    minors = [d for d in MINOR_DEGREES if d <= max_deg]
    others = [s for s in SEGMENTS if s != main]
    for s in rng.choice(others, size=min(int(rng.poisson(0.8)), 3), replace=False):
        seg[int(s)] = int(rng.choice(minors))
    return seg


class PatientPlan(Sequence):
    """n planned patients (indices first_index ...), each drawn when it is asked for: the ids and the balanced
    maximum degrees are drawn for all up front (a few bytes each), a patient's ECG model, coronary tree and
    views (about 22 KB) only on access, so writing a cohort holds one patient's plan at a time. The same
    index always gives an equal Patient."""

    def __init__(self, cfg: SynthConfig, n: int, first_index: int = 0):
        self.cfg, self.first = cfg, first_index
        self.ids = _unique_ids(rng_for(cfg.seed, _S_PATIENT, 0), first_index + n)[first_index:]
        levels = np.resize(MAX_DEGREE_LEVELS, first_index + n)
        self.levels = rng_for(cfg.seed, _S_PATIENT, 1).permutation(levels)[first_index:]

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, j):  # int -> Patient; slice -> list[Patient]
        if isinstance(j, slice):
            return [self[k] for k in range(*j.indices(len(self)))]
        j = range(len(self))[j]  # negative indices; IndexError past the end (ends iteration)
        return _plan_one(self.cfg, self.first + j, self.ids[j], int(self.levels[j]))


def plan_patients(cfg: SynthConfig, n: int, first_index: int = 0) -> PatientPlan:
    """Draw n patients (indices first_index ...); the maximum degrees are balanced over the levels."""
    return PatientPlan(cfg, n, first_index)


def _plan_one(cfg: SynthConfig, i: int, patient_id: str, level: int) -> Patient:
    rng = rng_for(cfg.seed, _S_PATIENT, 2, i)
    sex = "F" if rng.random() < 0.4 else "M"
    first = str(rng.choice(FIRST_NAMES_F if sex == "F" else FIRST_NAMES_M))
    study_date = dt.date(2014, 1, 1) + dt.timedelta(days=int(rng.integers(0, 3200)))
    age = int(rng.integers(38, 89))
    birth = study_date - dt.timedelta(days=int(age * 365.25 + rng.integers(0, 365)))
    segments = _segments(level, rng)
    study_uid = make_uid(cfg.seed, "study", i)
    return Patient(
        index=i,
        patient_id=patient_id,
        name=f"{rng.choice(LAST_NAMES)}^{first}",
        sex=sex,
        birth=birth,
        study_date=study_date,
        segments=segments,
        ecg=sample_patient(rng_for(cfg.seed, _S_ECG, i), segments),
        tree=sample_tree(rng_for(cfg.seed, _S_TREE, i)),
        study_uid=study_uid,
        folder="S" + hashlib.sha1(study_uid.encode()).hexdigest()[:12],  # no patient identifiers
        views=standard_views(cfg.views, rng_for(cfg.seed, _S_STUDY, i)),
    )


def make_record(
    cfg: SynthConfig, p: Patient, name: str, key: int, day_offset: int | None = None
) -> EcgRecord:
    """Simulate ECG number `key` of patient p (deterministic in (seed, patient, key))."""
    rng = rng_for(cfg.seed, _S_ECG, p.index, 1000 + key)
    if day_offset is None:
        day_offset = int(rng.integers(-PAIR_JITTER_DAYS, PAIR_JITTER_DAYS + 1))
    else:
        rng.integers(0, 2)  # keep the stream aligned with the default branch
    when = dt.datetime.combine(p.study_date + dt.timedelta(days=day_offset), dt.time(8, 0)) + dt.timedelta(
        minutes=int(rng.integers(0, 600))
    )
    fs = int(cfg.fs[int(rng.integers(len(cfg.fs)))])
    sig = simulate_ecg(p.ecg, fs, cfg.duration_s, rng, ecg_effect=cfg.ecg_effect, noise=cfg.noise).signal
    digital = np.clip(np.rint(sig.T * ECG_GAIN), -32767, 32767).astype(np.int16)  # (12, T) -> (T, 12)
    leads = STANDARD_LEADS
    if rng.random() < SHUFFLED_LEAD_FRACTION:  # ingest must select leads by name
        order = rng.permutation(len(leads))
        digital, leads = digital[:, order], tuple(leads[k] for k in order)
    comments = (
        f"Age: {age_on(p.birth, when.date())}",
        f"Sex: {p.sex}",
        f"Name: {p.name}",
        f"PatientID: {p.patient_id}",
        f"DOB: {p.birth.isoformat()}",
    )
    return EcgRecord(name, np.ascontiguousarray(digital), tuple(leads), fs, when, comments)


def xa_meta(cfg: SynthConfig, p: Patient, k: int, view: View) -> XaMeta:
    """Header fields of view k of patient p's study."""
    return XaMeta(
        patient_name=p.name,
        patient_id=p.patient_id,
        birth_date=p.birth.strftime("%Y%m%d"),
        sex=p.sex,
        study_uid=p.study_uid,
        series_uid=make_uid(cfg.seed, "series", p.index, k),
        sop_uid=make_uid(cfg.seed, "sop", p.index, k),
        study_date=p.study_date.strftime("%Y%m%d"),
        study_time=f"{9 + p.index % 8:02d}{(7 * p.index) % 60:02d}00",
        series_number=k + 1,
        primary_angle=view.primary,
        secondary_angle=view.secondary,
    )


def write_study(out: Path, cfg: SynthConfig, p: Patient) -> list[str]:
    """Render and write every view of p's study; returns the relative paths."""
    paths = []
    for k, view in enumerate(p.views):
        frames = render_view(
            p.tree, p.segments, view, frames=cfg.frames, size=cfg.image_size,
            rng=rng_for(cfg.seed, _S_VIEW, p.index, k), noise=cfg.noise,
        )  # fmt: skip
        rel = f"angio/{p.folder}/view_{k}.dcm"
        write_xa(out / rel, frames, xa_meta(cfg, p, k, view), cfg.compression)
        paths.append(rel)
    return paths


__all__ = [
    "MAX_DEGREE_LEVELS",
    "NAN_DIGITAL",
    "PAIR_JITTER_DAYS",
    "SynthConfig",
    "make_record",
    "PatientPlan",
    "plan_patients",
    "rng_for",
    "write_study",
    "xa_meta",
]
