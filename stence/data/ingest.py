"""Raw hospital export -> pseudonymised cohort (manifest, tables, memory-mappable caches, quarantine).

Expected export layout (documented in the README):
  RAW/ecg/**.hea (+ signal files)   WFDB records, any sampling rate and lead order
  RAW/ecg_index.csv                 record,patient_id,acquisition_date  (record = .hea path relative to RAW,
                                    without extension)
  RAW/angio/**                      DICOM XA views; grouped into studies by StudyInstanceUID
  RAW/annotations.csv               study_uid,segment,stenosis  (segment 1-16, degree 0-100 %)

Decoding is parallel (a process pool: decoding WFDB/DICOM and the baseline fit are CPU-bound and
independent per file, and ingest runs once on the machine that holds the export, so Ray's scheduling
buys nothing here; feature extraction, which needs GPUs on a cluster, uses Ray Data instead).
Output is built in `COHORT.partial/` and renamed into place only when complete: an interrupted ingest
leaves no half cohort, and re-running reuses the per-file results already in the staging folder.
"""

from __future__ import annotations

import datetime as dt
import json
import multiprocessing as mp
import os
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm import tqdm

from stence import errors as E
from stence.config import Config, to_dict
from stence.data import cohort_io
from stence.data.decode import DecodeSettings, decode_ecg, decode_xa
from stence.data.labels import TARGET_NAMES, max_degree, targets_from_segments
from stence.data.pseudonym import Pseudonymizer, resolve_salt, scan_files_for
from stence.data.splits import check_no_leakage, stratified_patient_split


@dataclass
class IngestReport:
    """What ingest built, what it quarantined and why."""

    cohort: Path
    n_ecgs: int = 0
    n_studies: int = 0
    n_views: int = 0
    n_pairs: int = 0
    n_patients: int = 0
    quarantined: Counter = field(default_factory=Counter)
    fingerprint: str = ""
    identifier_hits: int = 0

    def summary(self) -> str:
        lines = [
            f"cohort: {self.cohort}",
            f"  patients {self.n_patients}, ECGs {self.n_ecgs}, studies {self.n_studies}, views {self.n_views}, "
            f"pairs {self.n_pairs}",
            f"  fingerprint {self.fingerprint}",
            f"  quarantined {sum(self.quarantined.values())} file(s)/record(s)"
            + ("" if not self.quarantined else ":"),
        ]
        lines += [f"    {reason:28s} {n}" for reason, n in sorted(self.quarantined.items())]
        lines.append(f"  identifier scan of every written file: {self.identifier_hits} hit(s)")
        return "\n".join(lines)


class NothingUsableError(RuntimeError):
    """Ingest found no usable ECG-angiography pair."""


def _parse_date(v: Any) -> dt.date | None:
    if v is None or (isinstance(v, float) and np.isnan(v)):
        return None
    if isinstance(v, dt.datetime):
        return v.date()
    if isinstance(v, dt.date):
        return v
    s = str(v).strip()
    for fmt in ("%Y-%m-%d", "%Y%m%d", "%Y.%m.%d", "%d/%m/%Y"):
        try:
            return dt.datetime.strptime(s, fmt).date()
        except ValueError:
            continue
    return None


def _discover(raw: Path) -> tuple[list[str], list[str]]:
    ecg_root, angio_root = raw / "ecg", raw / "angio"
    heas = sorted(str(p.relative_to(raw)) for p in ecg_root.rglob("*.hea")) if ecg_root.is_dir() else []
    dicoms = (
        sorted(str(p.relative_to(raw)) for p in angio_root.rglob("*") if p.is_file() and not p.name.startswith("."))
        if angio_root.is_dir()
        else []
    )
    return heas, dicoms


def _run_pool(fn, jobs: list, processes: int, desc: str) -> list[dict]:
    if not jobs:
        return []
    if processes <= 1:
        return [fn(j) for j in tqdm(jobs, desc=desc, unit="file", mininterval=0.5)]
    ctx = mp.get_context("spawn")  # no fork of a process that may hold threads (torch, Ray)
    with ctx.Pool(processes) as pool:
        return list(
            tqdm(pool.imap(fn, jobs, chunksize=max(1, len(jobs) // (processes * 8))), total=len(jobs), desc=desc,
                 unit="file", mininterval=0.5)
        )


def ingest(raw: str | Path, out: str | Path, cfg: Config, processes: int | None = None) -> IngestReport:
    """Build a cohort from a raw export. Raises NothingUsableError when no pair survives."""
    raw, out = Path(raw).resolve(), Path(out).resolve()
    if not raw.is_dir():
        raise FileNotFoundError(f"raw export folder {raw} does not exist")
    pseudo = Pseudonymizer(resolve_salt(cfg.ingest.salt, cfg.ingest.salt_env))
    staging = out.with_name(out.name + ".partial")
    for sub in ("records", "views"):
        (staging / sub).mkdir(parents=True, exist_ok=True)
    d = cfg.data
    settings = DecodeSettings(
        raw=str(raw), staging=str(staging), fs=d.fs, leads=tuple(d.leads), als_lambda=d.als_lambda,
        als_p=d.als_p, als_iter=d.als_iter, min_valid_fraction=cfg.ingest.min_valid_fraction,
        frame_size=d.frame_size, key_frames=d.key_frames,
    )
    n_proc = processes if processes is not None else (cfg.ingest.processes or os.cpu_count() or 1)

    heas, dicoms = _discover(raw)
    quarantine: list[dict[str, str]] = []
    needles: set[str] = set()
    found_fields: Counter = Counter()

    def q(path: str, reason: str, detail: str = "") -> None:
        quarantine.append({"path": path, "reason": reason, "detail": detail})

    ecg_res = _run_pool(decode_ecg, [(h, settings) for h in heas], n_proc, "decode ECG")
    xa_res = _run_pool(decode_xa, [(p, settings) for p in dicoms], n_proc, "decode XA")

    for r in ecg_res + xa_res:
        for k, v in (r.get("identifiers") or {}).items():
            if v:
                found_fields[f"{r['kind']}:{k}"] += 1
                needles.add(str(v))

    # ---- ECG index (patient, date) -------------------------------------------------------------------
    index_path = raw / "ecg_index.csv"
    index: dict[str, tuple[str, dt.date | None]] = {}
    if index_path.exists():
        idx = pd.read_csv(index_path, dtype=str).fillna("")
        missing_cols = {"record", "patient_id", "acquisition_date"} - set(idx.columns)
        if missing_cols:
            raise ValueError(f"{index_path}: missing column(s) {sorted(missing_cols)}")
        for row in idx.itertuples(index=False):
            rec = str(row.record).removesuffix(".hea")
            index[rec] = (str(row.patient_id), _parse_date(row.acquisition_date))
            if row.patient_id:
                needles.add(str(row.patient_id))
    else:
        print(f"warning: {index_path} not found; ECG patient and date come from the WFDB headers")

    ecg_rows: list[dict[str, Any]] = []
    seen_hash: dict[str, str] = {}
    for r in ecg_res:
        rel = r["rel"]
        if not r["ok"]:
            q(rel, r["reason"], r["detail"])
            continue
        rec = rel.removesuffix(".hea")
        ids = r.get("identifiers") or {}
        pid, date = index.get(rec, (ids.get("patient_id") or "", r.get("base_date")))
        if not pid:
            q(rel, E.ECG_NOT_INDEXED, "no row in ecg_index.csv and no patient id in the header")
            continue
        if date is None:
            date = r.get("base_date")
        if r["content_hash"] in seen_hash:
            q(rel, E.ECG_DUPLICATE, f"same signal as {seen_hash[r['content_hash']]}")
            continue
        seen_hash[r["content_hash"]] = rel
        ecg_rows.append(
            dict(ecg_id=pseudo.pseudonym(rec, "ecg"), patient=pseudo.pseudonym(pid, "patient"), source=rel,
                 array=r["array"], n_samples=r["n_samples"], fs=d.fs, fs_orig=r["fs_orig"], age=r["age"],
                 sex=r["sex"], date=date, content_hash=r["content_hash"])
        )

    # ---- angiography views -> studies ----------------------------------------------------------------
    view_rows: list[dict[str, Any]] = []
    seen_sop: dict[str, str] = {}
    for r in xa_res:
        rel = r["rel"]
        if not r["ok"]:
            q(rel, r["reason"], r["detail"])
            continue
        if r["sop_uid"] in seen_sop:
            q(rel, E.DICOM_DUPLICATE, f"same SOPInstanceUID as {seen_sop[r['sop_uid']]}")
            continue
        seen_sop[r["sop_uid"]] = rel
        for uid in (r["study_uid"], r["sop_uid"], r["series_uid"]):
            if uid:
                needles.add(uid)
        pid = (r["identifiers"] or {}).get("patient_id") or ""
        if not pid:
            q(rel, E.DICOM_NO_PATIENT, "no PatientID in the header; the view cannot be paired with ECGs")
            continue
        view_rows.append(
            dict(view_id=pseudo.pseudonym(r["sop_uid"], "view"), study_uid=r["study_uid"],
                 study_id=pseudo.pseudonym(r["study_uid"], "study"), patient=pseudo.pseudonym(pid, "patient"),
                 source=rel, array=r["array"], primary_angle=r["primary_angle"],
                 secondary_angle=r["secondary_angle"], frame_time_ms=r["frame_time_ms"], n_frames=r["n_frames"],
                 rows=r["rows"], cols=r["cols"], transfer_syntax=r["transfer_syntax"], date=r["study_date"])
        )
    views = pd.DataFrame(view_rows)

    # ---- annotations ---------------------------------------------------------------------------------
    ann_path = raw / "annotations.csv"
    if not ann_path.exists():
        raise FileNotFoundError(f"{ann_path} not found: the segment-level stenosis table is required")
    ann = pd.read_csv(ann_path, dtype={"study_uid": str})
    missing_cols = {"study_uid", "segment", "stenosis"} - set(ann.columns)
    if missing_cols:
        raise ValueError(f"{ann_path}: missing column(s) {sorted(missing_cols)}")
    seg = pd.to_numeric(ann["segment"], errors="coerce")
    deg = pd.to_numeric(ann["stenosis"], errors="coerce")
    bad = ~(seg.between(1, 16) & (seg == seg.round()) & deg.between(0, 100))
    for i in np.flatnonzero(bad.to_numpy()):
        q(f"annotations.csv:{i + 2}", E.ANNOTATION_INVALID,
          f"segment {ann['segment'].iloc[i]!r}, stenosis {ann['stenosis'].iloc[i]!r}: need segment 1-16, degree 0-100")
    ann = ann.loc[~bad].assign(segment=seg[~bad].astype(int), stenosis=deg[~bad].astype(float))
    degrees_by_study: dict[str, dict[int, float]] = {}
    for uid, g in ann.groupby("study_uid"):
        # several rows for one segment (e.g. two lesions): the worst counts
        degrees_by_study[str(uid)] = g.groupby("segment")["stenosis"].max().to_dict()
    known_uids = set(views["study_uid"]) if len(views) else set()
    for uid in sorted(set(degrees_by_study) - known_uids):
        q("annotations.csv", E.ANNOTATION_UNKNOWN_STUDY,
          f"rows for study {pseudo.pseudonym(uid, 'study')} which has no usable angiography view")

    study_rows: list[dict[str, Any]] = []
    if len(views):
        for uid, g in views.groupby("study_uid", sort=True):
            if uid not in degrees_by_study:
                folder = str(Path(g["source"].iloc[0]).parent)
                q(folder, E.STUDY_NO_ANNOTATIONS, f"{len(g)} view(s) without stenosis annotations")
                continue
            degs = degrees_by_study[uid]
            t = targets_from_segments(degs)
            row = dict(study_id=g["study_id"].iloc[0], patient=g["patient"].iloc[0], n_views=len(g),
                       date=g["date"].dropna().iloc[0] if g["date"].notna().any() else None,
                       max_stenosis=max_degree(degs))
            row.update({f"t_{n}": float(v) for n, v in zip(TARGET_NAMES, t, strict=True)})
            row.update({f"seg{s}": float(degs.get(s, 0.0)) for s in range(1, 17)})
            study_rows.append(row)
    studies = pd.DataFrame(study_rows)
    views = views[views["study_id"].isin(set(studies["study_id"]))] if len(studies) else views.iloc[0:0]

    # ---- pairing -------------------------------------------------------------------------------------
    ecgs = pd.DataFrame(ecg_rows)
    pairs: list[dict[str, Any]] = []
    paired_ecgs: set[str] = set()
    if len(ecgs) and len(studies):
        by_patient = {p: g for p, g in ecgs.groupby("patient")}
        for s in studies.itertuples(index=False):
            cand = by_patient.get(s.patient)
            if cand is None or s.date is None:
                continue
            for e in cand.itertuples(index=False):
                if e.date is None:
                    continue
                delta = (e.date - s.date).days
                if abs(delta) <= d.pair_window_days:
                    pairs.append(dict(pair_id=f"{s.study_id}|{e.ecg_id}", patient=s.patient, ecg_id=e.ecg_id,
                                      study_id=s.study_id, delta_days=int(delta)))
                    paired_ecgs.add(e.ecg_id)
    for e in ecg_rows:
        if e["ecg_id"] not in paired_ecgs:
            q(e["source"], E.ECG_UNPAIRED,
              f"no angiography study of the patient within +/-{d.pair_window_days} days")
    ecgs = ecgs[ecgs["ecg_id"].isin(paired_ecgs)] if len(ecgs) else ecgs
    if not pairs:
        _write_quarantine_only(out, quarantine)
        raise NothingUsableError(
            f"no usable ECG-angiography pair in {raw}: {len(quarantine)} file(s) quarantined "
            f"(see {out}/quarantine.parquet)"
        )
    paired_studies = {p["study_id"] for p in pairs}
    studies = studies[studies["study_id"].isin(paired_studies)].reset_index(drop=True)
    views = views[views["study_id"].isin(paired_studies)].sort_values(["study_id", "view_id"]).reset_index(drop=True)

    # ---- splits by patient ---------------------------------------------------------------------------
    patient_max = studies.groupby("patient")["max_stenosis"].max()
    split_of = stratified_patient_split(patient_max, d.split_fractions, d.split_seed)

    manifest = pd.DataFrame(pairs).merge(
        studies[["study_id", "max_stenosis", "n_views"] + [f"t_{n}" for n in TARGET_NAMES]], on="study_id"
    )
    manifest = manifest.merge(ecgs[["ecg_id", "age", "sex", "fs_orig", "n_samples"]], on="ecg_id")
    manifest["split"] = manifest["patient"].map(split_of)
    manifest = manifest.sort_values("pair_id").reset_index(drop=True)
    check_no_leakage(manifest)

    # ---- caches + tables, written into staging, then renamed into place ------------------------------
    ecgs = ecgs.sort_values("ecg_id").reset_index(drop=True)
    ecgs["split"] = ecgs["patient"].map(split_of)
    cohort_io.write_ecg_cache(staging, ecgs)
    cohort_io.write_frame_cache(staging, views, d.key_frames, d.frame_size)
    studies["split"] = studies["patient"].map(split_of)
    tables = {
        "manifest": manifest,
        "ecgs": ecgs.drop(columns=["array", "date"]),
        "studies": studies.drop(columns=["date"]),
        "views": views.drop(columns=["array", "study_uid", "date"]),
        "quarantine": pd.DataFrame(quarantine, columns=["path", "reason", "detail"]),
    }
    for name, df in tables.items():
        cohort_io.write_table(staging / f"{name}.parquet", df)
    fingerprint = cohort_io.fingerprint(staging)
    report = IngestReport(
        cohort=out, n_ecgs=len(ecgs), n_studies=len(studies), n_views=len(views), n_pairs=len(manifest),
        n_patients=manifest["patient"].nunique(), quarantined=Counter(x["reason"] for x in quarantine),
        fingerprint=fingerprint,
    )
    cohort_meta = {
        "fingerprint": fingerprint,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "data_config": to_dict(cfg.data),
        "counts": {"patients": report.n_patients, "ecgs": report.n_ecgs, "studies": report.n_studies,
                   "views": report.n_views, "pairs": report.n_pairs,
                   "quarantined": dict(report.quarantined)},
        "splits": manifest.groupby("split")["patient"].nunique().to_dict(),
        "pairs_by_split": manifest["split"].value_counts().to_dict(),
    }
    (staging / "cohort.json").write_text(json.dumps(cohort_meta, indent=2, default=str))

    # the de-identification report: which fields were found and removed, and a scan of every output file
    finals = [p for p in staging.rglob("*") if p.is_file() and p.parent.name not in ("records", "views")]
    hits = scan_files_for(finals, needles)
    report.identifier_hits = len(hits)
    deid = {
        "salted_pseudonyms": ["patient", "ecg", "study", "view"],
        "fields_found_and_removed": dict(sorted(found_fields.items())),
        "dates": "absolute dates dropped; only ECG-to-angiogram offsets (delta_days) are kept",
        "scanned_files": len(finals),
        "identifier_values_scanned": len(needles),
        "hits": len(hits),
        "hit_files": sorted({h[0] for h in hits}),
    }
    (staging / "deid_report.json").write_text(json.dumps(deid, indent=2))
    if hits:
        raise RuntimeError(
            f"de-identification check failed: identifiers found in {sorted({h[0] for h in hits})}; "
            f"the cohort was not published (staging left at {staging})"
        )
    _publish(staging, out)
    return report


def _write_quarantine_only(out: Path, quarantine: list[dict[str, str]]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    cohort_io.write_table(out / "quarantine.parquet", pd.DataFrame(quarantine, columns=["path", "reason", "detail"]))


def _publish(staging: Path, out: Path) -> None:
    """Drop the per-file intermediates and swap the finished staging folder into place atomically."""
    shutil.rmtree(staging / "records", ignore_errors=True)
    shutil.rmtree(staging / "views", ignore_errors=True)
    old = out.with_name(out.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if out.exists():
        os.replace(out, old)
    os.replace(staging, out)
    if old.exists():
        shutil.rmtree(old)
