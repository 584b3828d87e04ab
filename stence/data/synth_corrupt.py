"""Corrupt and awkward inputs planted in a synthetic cohort, each recorded with its quarantine reason.

All are written *in addition to* the good files, which stay untouched: extra ECG records of existing
patients (in ecg_index.csv), extra files in existing study folders, extra studies of extra patients (no
ECGs), and annotation rows of a study that does not exist. Per family, about `corrupt_fraction` x (good
items of that family) are planted, spread evenly over its kinds, at least one of each kind.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np

from stence import errors
from stence.data.labels import SEGMENTS
from stence.data.synth_angio import View
from stence.data.synth_dicom import make_uid, write_ct, write_xa_undecodable, write_xa_without_pixels
from stence.data.synth_plan import (
    NAN_DIGITAL,
    SynthConfig,
    make_record,
    plan_patients,
    rng_for,
    write_study,
    xa_meta,
)
from stence.data.synth_records import EcgRecord, Patient
from stence.data.synth_vendor import person_for, record_format, write_ecg, write_record

ECG_KINDS = (
    errors.ECG_TRUNCATED,
    errors.ECG_MISSING_SIGNAL_FILE,
    errors.ECG_MISSING_LEADS,
    errors.ECG_NAN,
    errors.ECG_FLAT_LEAD,
    errors.ECG_BAD_HEADER,
    errors.ECG_DUPLICATE,
    errors.ECG_UNPAIRED,
)
DICOM_KINDS = (errors.DICOM_NO_PIXELS, errors.DICOM_NOT_XA, errors.DICOM_NO_DECODER)
STUDY_KINDS = (errors.STUDY_NO_ANNOTATIONS, errors.ANNOTATION_UNKNOWN_STUDY)
EIGHT_LEADS = ("I", "II", "V1", "V2", "V3", "V4", "V5", "V6")  # a common storage format, still rejected
_S_CORRUPT = 9


def corrupt_counts(cfg: SynthConfig) -> dict[str, int]:
    """How many files of each kind `plant_corrupt` writes for this config (0 if corrupt_fraction is 0)."""
    if cfg.corrupt_fraction <= 0:
        return {}
    families = (
        (ECG_KINDS, cfg.patients * cfg.ecgs_per_patient),
        (DICOM_KINDS, cfg.patients * cfg.views),
        (STUDY_KINDS, cfg.patients),
    )
    return {
        kind: max(1, round(cfg.corrupt_fraction * n_good / len(kinds)))
        for kinds, n_good in families
        for kind in kinds
    }


def _ecg_record(
    cfg: SynthConfig, p: Patient, name: str, kind: str, key: int, rng: np.random.Generator
) -> EcgRecord:
    """The record to write for one corrupt ECG (before any damage done to the written files)."""
    if kind == errors.ECG_UNPAIRED:  # no angiogram within +/- 60 days
        sign = 1 if rng.random() < 0.5 else -1
        return make_record(cfg, p, name, key, day_offset=sign * int(rng.integers(61, 200)))
    rec = make_record(cfg, p, name, key)
    digital = rec.digital.copy()
    if kind == errors.ECG_MISSING_LEADS:
        keep = [rec.leads.index(lead) for lead in EIGHT_LEADS]
        return dataclasses.replace(rec, digital=np.ascontiguousarray(digital[:, keep]), leads=EIGHT_LEADS)
    if kind == errors.ECG_NAN:  # a dropout covering 75 % of the record
        n = len(digital)
        start = int(rng.integers(0, n // 4 + 1))
        digital[start : start + int(0.75 * n)] = NAN_DIGITAL  # WFDB format-16 invalid sample -> NaN on read
    elif kind == errors.ECG_FLAT_LEAD:
        lead = int(rng.integers(len(rec.leads)))
        digital[:, lead] = digital[0, lead]
    return dataclasses.replace(rec, digital=digital)


def _damage_files(ecg_dir: Path, rec: EcgRecord, kind: str) -> None:
    """Break the written files of a record the way `kind` says."""
    hea, dat = ecg_dir / f"{rec.name}.hea", ecg_dir / f"{rec.name}.dat"
    if kind == errors.ECG_TRUNCATED:
        frame = 2 * len(rec.leads)  # bytes per sample frame in format 16
        keep = int(0.4 * len(rec.digital)) * frame
        dat.write_bytes(dat.read_bytes()[:keep])
    elif kind == errors.ECG_MISSING_SIGNAL_FILE:
        dat.unlink()
    elif kind == errors.ECG_BAD_HEADER:
        lines = hea.read_text().split("\n")
        fields = lines[0].split(" ")
        # record line: name, n_signals, fs, n_samples, time, date. wfdb silently reads a bad fs alone as
        # its 250 Hz default, so the signal count is broken too: the header then fails to parse.
        fields[1], fields[2] = "twelve", "abc"
        lines[0] = " ".join(fields)
        hea.write_text("\n".join(lines))


def _plant_ecgs(
    out: Path, cfg: SynthConfig, patients: list[Patient], counts: dict[str, int], first_record: int,
    index_rows: list[list[Any]],
) -> list[dict[str, Any]]:  # fmt: skip
    rng = rng_for(cfg.seed, _S_CORRUPT, 1)
    items, n_record = [], first_record
    for kind in ECG_KINDS:
        for _ in range(counts[kind]):
            p = patients[int(rng.integers(len(patients)))]
            name = f"E{n_record:06d}"
            extra: dict[str, Any] = {}
            if kind == errors.ECG_DUPLICATE:  # an exact copy of one of p's good records, under a new name,
                j = int(rng.integers(cfg.ecgs_per_patient))  # in the original's format (mixed exports)
                original = p.index * cfg.ecgs_per_patient + j  # write_cohort's numbering
                rec = make_record(cfg, p, name, j)
                fmt = record_format(cfg.ecg_format, cfg.seed, original)
                written = write_ecg(out / "ecg", rec, fmt, person_for(p))
                extra["duplicate_of"] = f"ecg/E{original:06d}" + written[len(name):]
                record, path = f"ecg/{written}", f"ecg/{written}" if fmt != "wfdb" else f"ecg/{name}.hea"
            else:
                rec = _ecg_record(cfg, p, name, kind, 10_000 + n_record, rng)
                write_record(out / "ecg", rec)
                _damage_files(out / "ecg", rec, kind)
                record, path = f"ecg/{name}", f"ecg/{name}.hea"
            n_record += 1
            date = rec.when.date().isoformat()
            index_rows.append([record, p.patient_id, date])
            items.append({"kind": kind, "path": path, "record": record,
                          "patient_id": p.patient_id, "date": date, **extra})  # fmt: skip
    return items


def _plant_dicoms(
    out: Path, cfg: SynthConfig, patients: list[Patient], counts: dict[str, int]
) -> list[dict[str, Any]]:
    rng = rng_for(cfg.seed, _S_CORRUPT, 2)
    next_view: dict[int, int] = {}
    items = []
    for kind in DICOM_KINDS:
        for _ in range(counts[kind]):
            p = patients[int(rng.integers(len(patients)))]
            k = next_view.get(p.index, cfg.views)
            next_view[p.index] = k + 1
            view = View(round(float(rng.uniform(-40, 40)), 1), round(float(rng.uniform(-30, 30)), 1))
            meta = xa_meta(cfg, p, k, view)
            rel = f"angio/{p.folder}/view_{k}.dcm"
            if kind == errors.DICOM_NO_PIXELS:
                write_xa_without_pixels(out / rel, meta, cfg.frames, cfg.image_size)
            elif kind == errors.DICOM_NOT_XA:
                yy, xx = np.mgrid[0 : cfg.image_size, 0 : cfg.image_size] / cfg.image_size - 0.5
                body = (xx**2 + yy**2 < 0.16) * 120 + rng.normal(0, 5, xx.shape) + 20
                write_ct(out / rel, meta, np.clip(body, 0, 255).astype(np.uint8))
            else:
                write_xa_undecodable(out / rel, meta, cfg.frames, cfg.image_size, rng)
            items.append({"kind": kind, "path": rel, "study_uid": p.study_uid, "patient_id": p.patient_id})
    return items


def _plant_studies(
    out: Path, cfg: SynthConfig, counts: dict[str, int], annotation_rows: list[list[Any]]
) -> list[dict[str, Any]]:
    items = []
    # studies of extra patients (no ECGs) whose annotation rows are missing
    for p in plan_patients(cfg, counts[errors.STUDY_NO_ANNOTATIONS], first_index=cfg.patients):
        views = write_study(out, cfg, p)
        item = {"kind": errors.STUDY_NO_ANNOTATIONS, "path": f"angio/{p.folder}", "study_uid": p.study_uid}
        items.append({**item, "patient_id": p.patient_id, "name": p.name, "views": views})
    rng = rng_for(cfg.seed, _S_CORRUPT, 3)
    for m in range(counts[errors.ANNOTATION_UNKNOWN_STUDY]):
        uid = make_uid(cfg.seed, "unknown-study", m)
        annotation_rows += [[uid, s, int(rng.choice([0, 0, 0, 50, 90]))] for s in SEGMENTS]
        items.append({"kind": errors.ANNOTATION_UNKNOWN_STUDY, "path": "annotations.csv", "study_uid": uid})
    return items


def plant_corrupt(
    out: Path,
    cfg: SynthConfig,
    patients: list[Patient],
    first_record: int,
    index_rows: list[list[Any]],
    annotation_rows: list[list[Any]],
) -> list[dict[str, Any]]:
    """Write the corrupt files, extend the index and annotation rows, return the answer-key entries."""
    counts = corrupt_counts(cfg)
    if not counts:
        return []
    items = _plant_ecgs(out, cfg, patients, counts, first_record, index_rows)
    items += _plant_dicoms(out, cfg, patients, counts)
    items += _plant_studies(out, cfg, counts, annotation_rows)
    return items


__all__ = ["DICOM_KINDS", "ECG_KINDS", "EIGHT_LEADS", "STUDY_KINDS", "corrupt_counts", "plant_corrupt"]
