"""Decoded files -> ECG, view, study and pair rows (ingest's middle step; no I/O but the ledger).

Rows keep the raw file path under `_rel` (and the study UID under `_uid`) only while ingest runs: every
column whose name starts with "_" is dropped before anything is written.
"""

from __future__ import annotations

from typing import Any

import pandas as pd

from stence import errors as E
from stence.data.export_tables import Annotations, EcgIndex
from stence.data.labels import TARGET_NAMES, max_degree, targets_from_segments
from stence.data.ledger import Ledger

SAFE_HARBOR_MAX_AGE = 90  # ages above 89 are written as 90 ("90 or older"), as HIPAA Safe Harbor requires


def _record_of(rel: str) -> str:
    return rel[:-4] if rel.lower().endswith(".hea") else rel


def _index_disagrees(r: dict, pid: str, date: Any) -> str:
    """Why a vendor file's own patient ID or acquisition date contradicts its ecg_index.csv row ("" if not).

    The index wins where both exist, but a contradiction means one of them names the wrong patient or visit:
    the record is quarantined (the detail names no value). WFDB header comments are free text, so only
    vendor files, whose patient ID is a dedicated element, are checked."""
    if r.get("format", "wfdb") == "wfdb":
        return ""
    own_pid = str((r.get("identifiers") or {}).get("patient_id") or "").strip()
    if pid and own_pid and own_pid.casefold() != str(pid).strip().casefold():
        return "the patient ID inside the file differs from its ecg_index.csv row"
    own_date = r.get("base_date")
    if date is not None and own_date is not None and own_date != date:
        return "the acquisition date inside the file differs from its ecg_index.csv row"
    return ""


def ecg_rows(results: list[dict], index: EcgIndex | None, ledger: Ledger, fs: int) -> list[dict[str, Any]]:
    """Usable ECGs, one row each; every other record quarantined with its reason."""
    rows: list[dict[str, Any]] = []
    seen_hash: dict[str, str] = {}
    for r in results:
        rel = r["rel"]
        if not r["ok"]:
            ledger.quarantine(rel, r["reason"], r["detail"])
            continue
        rec = _record_of(rel)
        if index is not None and rec in index.invalid_records:
            ledger.quarantine(rel, E.ECG_INDEX_INVALID, f"its ecg_index.csv row is unusable: {index.invalid_records[rec]}")
            continue
        pid, date = index.rows.get(rec, ("", None)) if index is not None else ("", None)
        mismatch = _index_disagrees(r, pid, date)
        if mismatch:
            ledger.quarantine(rel, E.ECG_INDEX_MISMATCH, mismatch)
            continue
        pid = pid or (r.get("identifiers") or {}).get("patient_id") or ""
        date = date or r.get("base_date")  # an empty acquisition_date (or no index row) means the header date
        if not pid:
            ledger.quarantine(rel, E.ECG_NOT_INDEXED, "no row in ecg_index.csv and no patient id in the header")
            continue
        if r["content_hash"] in seen_hash:
            ledger.quarantine(rel, E.ECG_DUPLICATE, f"same signal as {ledger.file_id(seen_hash[r['content_hash']])}")
            continue
        seen_hash[r["content_hash"]] = rel
        age = r.get("age")
        rows.append(dict(
            ecg_id=ledger.pseudo.pseudonym(rec, "ecg"), patient=ledger.pseudo.pseudonym(pid, "patient"),
            file=ledger.file_id(rel), array=r["array"], n_samples=r["n_samples"], fs=fs, fs_orig=r["fs_orig"],
            source_array=r["source_array"], src_n_samples=r["src_n_samples"],
            age=None if age is None else float(min(age, SAFE_HARBOR_MAX_AGE)), sex=r["sex"], date=date,
            content_hash=r["content_hash"], _rel=rel, _signal_files=tuple(r.get("signal_files") or ()),
        ))
    return rows


def view_rows(results: list[dict], ledger: Ledger) -> list[dict[str, Any]]:
    """Usable XA views, one row each; every other file quarantined with its reason."""
    rows: list[dict[str, Any]] = []
    seen_sop: dict[str, str] = {}
    for r in results:
        rel = r["rel"]
        if not r["ok"]:
            ledger.quarantine(rel, r["reason"], r["detail"])
            continue
        if r["sop_uid"] in seen_sop:
            ledger.quarantine(rel, E.DICOM_DUPLICATE, f"same SOPInstanceUID as {ledger.file_id(seen_sop[r['sop_uid']])}")
            continue
        seen_sop[r["sop_uid"]] = rel
        pid = (r["identifiers"] or {}).get("patient_id") or ""
        if not pid:
            ledger.quarantine(rel, E.DICOM_NO_PATIENT, "no PatientID in the header; the view cannot be paired with ECGs")
            continue
        p = ledger.pseudo
        rows.append(dict(
            view_id=p.pseudonym(r["sop_uid"], "view"), study_id=p.pseudonym(r["study_uid"], "study"),
            patient=p.pseudonym(pid, "patient"), file=ledger.file_id(rel), array=r["array"],
            primary_angle=r["primary_angle"], secondary_angle=r["secondary_angle"],
            frame_time_ms=r["frame_time_ms"], n_frames=r["n_frames"], rows=r["rows"], cols=r["cols"],
            transfer_syntax=r["transfer_syntax"], date=r["study_date"], _uid=r["study_uid"], _rel=rel,
        ))
    return rows


def study_rows(views: list[dict], ann: Annotations, ledger: Ledger) -> tuple[pd.DataFrame, list[dict]]:
    """Studies with annotations (targets, segment degrees) and the views that belong to them."""
    by_uid: dict[str, list[dict]] = {}
    for v in views:
        by_uid.setdefault(v["_uid"], []).append(v)
    for uid in sorted(set(ann.degrees) - set(by_uid)):
        ledger.quarantine("annotations.csv", E.ANNOTATION_UNKNOWN_STUDY,
                          f"rows for study {ledger.pseudo.pseudonym(uid, 'study')} which has no usable view",
                          label="annotations.csv")
    studies, kept = [], []
    for uid in sorted(by_uid):
        vs = by_uid[uid]
        if uid not in ann.degrees:
            for v in vs:
                ledger.quarantine(v["_rel"], E.STUDY_NO_ANNOTATIONS,
                                  f"study {v['study_id']} ({len(vs)} view(s)) has no stenosis annotations")
            continue
        degs = ann.degrees[uid]
        dates = [v["date"] for v in vs if v["date"] is not None]
        row = dict(study_id=vs[0]["study_id"], patient=vs[0]["patient"], n_views=len(vs),
                   date=dates[0] if dates else None, max_stenosis=max_degree(degs))
        row.update({f"t_{n}": float(x) for n, x in zip(TARGET_NAMES, targets_from_segments(degs), strict=True)})
        row.update({f"seg{s}": float(degs.get(s, 0.0)) for s in range(1, 17)})
        studies.append(row)
        kept += vs
    return pd.DataFrame(studies), kept


def pair(ecgs: list[dict], studies: pd.DataFrame, window_days: int) -> list[dict[str, Any]]:
    """ECG-study pairs of the same patient within +/- window_days."""
    pairs: list[dict[str, Any]] = []
    if not ecgs or not len(studies):
        return pairs
    by_patient: dict[str, list[dict]] = {}
    for e in ecgs:
        by_patient.setdefault(e["patient"], []).append(e)
    for s in studies.itertuples(index=False):
        if s.date is None:
            continue
        for e in by_patient.get(s.patient, []):
            if e["date"] is None:
                continue
            delta = (e["date"] - s.date).days
            if abs(delta) <= window_days:
                pairs.append(dict(pair_id=f"{s.study_id}|{e['ecg_id']}", patient=s.patient, ecg_id=e["ecg_id"],
                                  study_id=s.study_id, delta_days=int(delta)))
    return pairs


def drop_private(df: pd.DataFrame) -> pd.DataFrame:
    """Without the ingest-only columns (raw paths, UIDs)."""
    return df.drop(columns=[c for c in df.columns if c.startswith("_")])
