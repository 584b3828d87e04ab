"""The synthetic cohort writer: a folder laid out like a hospital export, plus an answer key for tests.

`write_cohort(out, cfg)` writes ECGs (`ecg/`, `ecg_index.csv`; WFDB or a hospital format, see
synth_vendor), XA DICOM studies (`angio/`), stenosis annotations (`annotations.csv`), optionally an
EchoNext-format folder (`echonext/`) and optionally corrupt files (see `synth_corrupt`, WFDB only), and
`synth_truth.json`, which only tests read. Every random draw comes from a generator keyed by (seed,
stream, patient, item), so the same seed gives byte-identical files. The layout is the one ingest
reads (see stence/data/ingest.py).
"""

from __future__ import annotations

import csv
import dataclasses
import datetime as dt
import hashlib
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from stence.config import STANDARD_LEADS
from stence.data.labels import MAJOR_SEGMENTS, SEGMENTS, max_degree
from stence.data.synth_angio import CoronaryTree, View, render_view, sample_tree, standard_views
from stence.data.synth_dicom import COMPRESSIONS, XaMeta, make_uid, write_xa
from stence.data.synth_ecg import EcgPatient, sample_patient, simulate_ecg
from stence.data.synth_echonext import write_echonext
from stence.data.synth_vendor import (
    ECG_FORMATS,
    ECG_GAIN,
    age_on,
    person_for,
    record_format,
    write_ecg,
    write_record,
    write_record_wfdb,
)
from stence.outputs import check_output, mark_output

MAX_DEGREE_LEVELS = (0, 50, 70, 90, 99, 100)  # balanced over patients: every threshold task has 2 classes
MINOR_DEGREES = (30, 40, 50, 60)
NAN_DIGITAL = -32768  # WFDB invalid-sample value of format 16, read back as NaN
PAIR_JITTER_DAYS = 20  # good ECGs lie within +/- this many days of the study (pairing window is 30)
SHUFFLED_LEAD_FRACTION = 0.2
TRUTH_FILE = "synth_truth.json"
# random streams (second key of every generator)
_S_PATIENT, _S_ECG, _S_TREE, _S_VIEW, _S_STUDY = 1, 2, 3, 4, 5

_FIRST_F = (
    "Alma", "Brita", "Carla", "Dagny", "Edda", "Frida", "Greta", "Hilde", "Ines", "Jorun", "Kaja", "Liv",
)  # fmt: skip
_FIRST_M = (
    "Arvid", "Bodo", "Cyrus", "Dario", "Egon", "Falk", "Gero", "Hauke", "Ivo", "Jannes", "Kuno", "Lutz",
)  # fmt: skip
_LAST = (
    "Abelmann", "Birkfeld", "Czernik", "Dornquist", "Eschholt", "Fennrich", "Gulbrand", "Harvold",
    "Isenhart", "Jorvik", "Kesselring", "Lindqvar", "Morvath", "Nordhaus", "Ostrander", "Pellwitz",
)  # fmt: skip


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


@dataclass(frozen=True)
class SynthSummary:
    """Counts of what was written (good items; corrupt files by reason code)."""

    out: Path
    patients: int
    ecgs: int
    studies: int
    views: int
    corrupt: dict[str, int] = field(default_factory=dict)
    echonext: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    def format(self) -> str:
        """Human-readable multi-line summary."""
        lines = [
            f"synthetic cohort written to {self.out} in {self.seconds:.1f} s",
            f"  patients {self.patients}, ECGs {self.ecgs}, studies {self.studies}, views {self.views}",
        ]
        if self.corrupt:
            lines.append(f"  corrupt files {sum(self.corrupt.values())}:")
            lines += [f"    {kind:<26} {n}" for kind, n in sorted(self.corrupt.items())]
        if self.echonext:
            lines.append("  EchoNext ECGs " + ", ".join(f"{s} {n}" for s, n in self.echonext.items()))
        return "\n".join(lines)


@dataclass
class Patient:
    """One planned patient: identifiers, dates, lesions and the models that generate the data."""

    index: int
    patient_id: str
    name: str
    sex: str
    birth: dt.date
    study_date: dt.date
    segments: dict[int, int]
    ecg: EcgPatient
    tree: CoronaryTree
    study_uid: str
    folder: str
    views: list[View]


@dataclass(frozen=True)
class EcgRecord:
    """A record ready to write: digital signal (T, n_leads) int16 with its lead names."""

    name: str
    digital: np.ndarray
    leads: tuple[str, ...]
    fs: int
    when: dt.datetime
    comments: tuple[str, ...]


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


def plan_patients(cfg: SynthConfig, n: int, first_index: int = 0) -> list[Patient]:
    """Draw n patients (indices first_index ...); the maximum degrees are balanced over the levels."""
    ids = _unique_ids(rng_for(cfg.seed, _S_PATIENT, 0), first_index + n)[first_index:]
    levels = np.resize(MAX_DEGREE_LEVELS, first_index + n)
    levels = rng_for(cfg.seed, _S_PATIENT, 1).permutation(levels)[first_index:]
    out = []
    for j in range(n):
        i = first_index + j
        rng = rng_for(cfg.seed, _S_PATIENT, 2, i)
        sex = "F" if rng.random() < 0.4 else "M"
        first = str(rng.choice(_FIRST_F if sex == "F" else _FIRST_M))
        study_date = dt.date(2014, 1, 1) + dt.timedelta(days=int(rng.integers(0, 3200)))
        age = int(rng.integers(38, 89))
        birth = study_date - dt.timedelta(days=int(age * 365.25 + rng.integers(0, 365)))
        segments = _segments(int(levels[j]), rng)
        study_uid = make_uid(cfg.seed, "study", i)
        out.append(
            Patient(
                index=i,
                patient_id=ids[j],
                name=f"{rng.choice(_LAST)}^{first}",
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
        )
    return out


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


SYNTH_KIND = "synth"  # output kind in the ownership marker (stence/outputs.py)
_SYNTH_ENTRIES = ("ecg", "angio", "echonext", "ecg_index.csv", "annotations.csv", TRUTH_FILE)


def _prepare(out: Path, overwrite: bool) -> None:
    """Claim `out` (new, empty, or our own earlier synth output with `overwrite`; else OutputRefused, nothing
    touched), then remove what an earlier synth wrote there (only the entries synth writes)."""
    check_output(out, SYNTH_KIND, overwrite=overwrite)
    for name in _SYNTH_ENTRIES:
        target = out / name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        elif target.exists() or target.is_symlink():
            target.unlink()
    mark_output(out, SYNTH_KIND)
    (out / "ecg").mkdir(parents=True, exist_ok=True)
    (out / "angio").mkdir(parents=True, exist_ok=True)


def _write_csv(path: Path, header: list[str], rows: list[list[Any]]) -> None:
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(header)
        w.writerows(rows)


def write_cohort(
    out: Path, cfg: SynthConfig, *, progress: bool = False, overwrite: bool = False
) -> SynthSummary:
    """Write the whole synthetic cohort under `out` (see the module docstring); returns the counts.

    `out` must be new, empty, or (with `overwrite`) this function's own earlier output, recognised by its
    marker (stence/outputs.py); anything else raises `OutputRefused` and leaves the folder untouched."""
    from stence.data.synth_corrupt import plant_corrupt  # corrupt planting builds on this module

    t0 = time.perf_counter()
    out = Path(out)
    _prepare(out, overwrite)
    patients = plan_patients(cfg, cfg.patients)
    index_rows: list[list[Any]] = []
    annotation_rows: list[list[Any]] = []
    truth_patients: list[dict[str, Any]] = []
    n_record = 0
    for p in tqdm(patients, desc="synth cohort", unit="patient", disable=not progress):
        ecgs = []
        for j in range(cfg.ecgs_per_patient):
            rec = make_record(cfg, p, f"E{n_record:06d}", j)
            fmt = record_format(cfg.ecg_format, cfg.seed, n_record)  # its own stream: the rest is unchanged
            n_record += 1
            rel = "ecg/" + write_ecg(out / "ecg", rec, fmt, person_for(p))  # WFDB without extension
            index_rows.append([rel, p.patient_id, rec.when.date().isoformat()])
            ecgs.append({"record": rel, "format": fmt, "date": rec.when.date().isoformat(), "fs": rec.fs,
                         "leads_shuffled": rec.leads != STANDARD_LEADS})  # fmt: skip
        views = write_study(out, cfg, p)
        annotation_rows += [[p.study_uid, s, p.segments[s]] for s in SEGMENTS]
        truth_patients.append(_truth_patient(p, views, ecgs))

    corrupt = (
        plant_corrupt(out, cfg, patients, n_record, index_rows, annotation_rows)
        if cfg.corrupt_fraction
        else []
    )
    _write_csv(out / "ecg_index.csv", ["record", "patient_id", "acquisition_date"], index_rows)
    _write_csv(out / "annotations.csv", ["study_uid", "segment", "stenosis"], annotation_rows)
    echonext = write_echonext(out / "echonext", cfg.echonext, cfg.seed, cfg.noise) if cfg.echonext else {}
    truth = {
        "params": {**dataclasses.asdict(cfg), "fs": list(cfg.fs), "generator": "stence.data.synth"},
        "patients": truth_patients,
        "corrupt": corrupt,
        "echonext": echonext,
    }
    (out / TRUTH_FILE).write_text(json.dumps(truth, indent=1, sort_keys=True) + "\n")
    kinds: dict[str, int] = {}
    for c in corrupt:
        kinds[c["kind"]] = kinds.get(c["kind"], 0) + 1
    return SynthSummary(
        out=out,
        patients=len(patients),
        ecgs=len(patients) * cfg.ecgs_per_patient,
        studies=len(patients),
        views=len(patients) * cfg.views,
        corrupt=kinds,
        echonext=echonext,
        seconds=time.perf_counter() - t0,
    )


def _truth_patient(p: Patient, views: list[str], ecgs: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "patient_id": p.patient_id,
        "name": p.name,
        "sex": p.sex,
        "birth_date": p.birth.isoformat(),
        "max_degree": max_degree(p.segments),
        "studies": [
            {
                "study_uid": p.study_uid,
                "folder": f"angio/{p.folder}",
                "date": p.study_date.isoformat(),
                "segments": {str(s): d for s, d in p.segments.items()},
                "views": views,
                "angles": [[v.primary, v.secondary] for v in p.views],
            }
        ],
        "ecgs": ecgs,
    }


def load_truth(out: Path) -> dict[str, Any]:
    """The answer key written next to a cohort (tests only; ingest never reads it)."""
    return json.loads((Path(out) / TRUTH_FILE).read_text())


__all__ = [
    "EcgRecord",
    "MAX_DEGREE_LEVELS",
    "Patient",
    "SynthConfig",
    "SynthSummary",
    "TRUTH_FILE",
    "load_truth",
    "make_record",
    "plan_patients",
    "rng_for",
    "write_cohort",
    "write_record",
    "write_record_wfdb",
    "write_study",
    "xa_meta",
]
