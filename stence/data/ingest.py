"""Raw hospital export -> pseudonymised cohort (manifest, tables, memory-mappable caches, quarantine).

Steps, in order; each refuses early with one line rather than touching anything:
  1. outputs: the cohort folder must be new, empty, or an earlier cohort with `overwrite`, and neither
     equal to, inside, nor containing RAW (stence/outputs.py); likewise its staging and site folders;
  2. inventory: every file under RAW classified (stence/data/inventory.py);
  3. tables: annotations.csv and ecg_index.csv read and validated before any decoding;
  4. decode: WFDB records and XA views in a process pool that survives a dying worker (pool.py), each
     file bounded by `ingest.*` limits checked from its header (limits.py);
  5. rows, studies, pairs, patient splits; every file used or quarantined with a reason (ledger.py);
  6. caches and tables written into `COHORT.partial/` (space reserved up front: a full disk is an error,
     not a SIGBUS), the leak scan of everything written, then an atomic rename into place.
The site-side map (file pseudonym -> original path) goes to `ingest.site_dir`, default
`COHORT.site-identifiers/` beside the cohort: it holds identifiers and never enters the cohort.

Decoding and the baseline fit are CPU-bound and independent per file: a local process pool by default,
or Ray Data over a Ray cluster's nodes (`engine="ray"`, ray_decode.py) when the export and the cohort
folder are on storage every node mounts. Everything after decoding runs in this process.
"""

from __future__ import annotations

import datetime as dt
import errno
import json
import os
import re
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from stence import errors as E
from stence.config import Config, to_dict
from stence.data import cohort_io
from stence.data.contract import project_contract
from stence.data.decode import DecodeSettings, decode_ecg, decode_file, decode_xa
from stence.data.export_tables import ExportTableError, read_annotations, read_ecg_index
from stence.data.inventory import Inventory, take_inventory
from stence.data.labels import TARGET_NAMES
from stence.data.ledger import Ledger
from stence.data.limits import Limits
from stence.data.pairing import drop_private, ecg_rows, pair, study_rows, view_rows
from stence.data.pool import run_jobs
from stence.data.pseudonym import Pseudonymizer, check_secret, resolve_salt, scan_files_for
from stence.data.splits import check_no_leakage, stratified_patient_split
from stence.outputs import MARKER, OutputRefused, check_output, mark_output, output_kind

COHORT_KIND, STAGING_KIND, SITE_KIND = "cohort", "cohort-staging", "site-identifiers"
SITE_MAP = "paths_by_pseudonym.csv"
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


@dataclass
class IngestReport:
    """What ingest built, what it quarantined and why, and where the site-side path map is."""

    cohort: Path
    site_dir: Path | None = None
    n_files: int = 0
    n_ecgs: int = 0
    n_studies: int = 0
    n_views: int = 0
    n_pairs: int = 0
    n_patients: int = 0
    quarantined: Counter = field(default_factory=Counter)
    ignored: int = 0
    fingerprint: str = ""
    identifier_hits: int = 0
    identifiers_scanned: int = 0
    redacted: Counter = field(default_factory=Counter)
    public_secret: bool = False  # pseudonymised with the demo's public secret (a synthetic export only)

    def summary(self) -> str:
        lines = [
            f"cohort: {self.cohort}",
            f"  files under the export {self.n_files}: used or quarantined, each one "
            f"({self.ignored} recognised and not read)",
            f"  patients {self.n_patients}, ECGs {self.n_ecgs}, studies {self.n_studies}, views {self.n_views}, "
            f"pairs {self.n_pairs}",
            f"  fingerprint {self.fingerprint}",
            f"  quarantined {sum(self.quarantined.values())} file(s)/row(s)" + (":" if self.quarantined else ""),
        ]
        lines += [f"    {reason:28s} {n}" for reason, n in sorted(self.quarantined.items())]
        if self.redacted:
            lines.append(f"  identifiers removed from quarantine details: {sum(self.redacted.values())}")
        lines.append(f"  identifier scan of every written file ({self.identifiers_scanned} values, file and "
                     f"folder names included): {self.identifier_hits} hit(s)")
        if self.public_secret:
            lines.append("  pseudonyms made with the demo's PUBLIC secret: fine for this synthetic export only "
                         "(cohort.json says so)")
        if self.site_dir:
            lines.append(f"  site-only map of pseudonyms to original paths (holds identifiers): "
                         f"{self.site_dir / SITE_MAP}")
        return "\n".join(lines)


class NothingUsableError(RuntimeError):
    """Ingest found no usable ECG-angiography pair (no cohort was written or replaced)."""


class IdentifierLeakError(RuntimeError):
    """An identifier survived into a written file; the cohort was not published."""


class DiskFullError(RuntimeError):
    """The disk filled while writing; any earlier cohort is untouched."""


def site_dir_for(cfg: Config, out: Path) -> Path:
    """Where the site-side map goes: `ingest.site_dir`, else `<cohort>.site-identifiers` beside the cohort."""
    return Path(cfg.ingest.site_dir).resolve() if cfg.ingest.site_dir else out.with_name(out.name + ".site-identifiers")


def read_site_map(site: Path) -> pd.DataFrame:
    """The site-only map (file pseudonym -> original path, status, reason, record); it holds identifiers."""
    return pd.read_csv(Path(site) / SITE_MAP, dtype=str, keep_default_na=False)


def _check_outputs(raw: Path, out: Path, site: Path, overwrite: bool) -> Path:
    """Every folder ingest writes is checked before anything is read; returns the staging folder."""
    check_output(out, COHORT_KIND, [raw], overwrite)
    staging = out.with_name(out.name + ".partial")
    if output_kind(staging) == COHORT_KIND:  # interrupted between marking and renaming
        mark_output(staging, STAGING_KIND)
    check_output(staging, STAGING_KIND, [raw], overwrite=True)
    old = out.with_name(out.name + ".old")
    if old.exists() and output_kind(old) != COHORT_KIND:
        raise OutputRefused(f"{old} exists and is not an earlier stence cohort; move it away first")
    check_output(site, SITE_KIND, [raw, out, staging], overwrite=True)
    return staging


def ingest(raw: str | Path, out: str | Path, cfg: Config, processes: int | None = None,
           overwrite: bool = False, engine: str | None = None) -> IngestReport:
    """Build a cohort from a raw export (see the module docstring).

    `engine` runs the decode jobs: "local" (the default, None too) in a process pool of `processes`
    workers on this machine, or "ray" with Ray Data over the connected Ray cluster (ray_decode.py; the
    export and `out` must then be on storage every node mounts). Both give the same cohort and fingerprint.
    Which one RAY_ADDRESS or `stence ingest --ray` asks for is decided by stence.pipelines.ingest.

    Raises OutputRefused, ExportTableError, SaltError, NothingUsableError, IdentifierLeakError or
    DiskFullError, each with a one-line message; nothing outside the staging and site folders is written
    before the final rename."""
    raw, out = Path(raw).resolve(), Path(out).resolve()
    if not raw.is_dir():
        raise FileNotFoundError(f"raw export folder {raw} does not exist")
    site = site_dir_for(cfg, out)
    staging = _check_outputs(raw, out, site, overwrite)
    secret = resolve_salt(cfg.ingest.salt_file, cfg.ingest.salt_env)
    synthetic = output_kind(raw) == "synth"  # the marker `stence synth` writes
    public_secret = check_secret(secret, synthetic)
    ledger = Ledger(Pseudonymizer(secret))
    del secret
    inv = take_inventory(raw)
    if inv.annotations is None:
        raise ExportTableError(f"annotations.csv not found in {raw}: the segment-level stenosis table "
                               "(study_uid,segment,stenosis) is required")
    ann = read_annotations(raw / inv.annotations)
    index = read_ecg_index(raw / inv.index) if inv.index else None
    _account_tables(inv, ann, index, ledger)
    try:
        return _build(raw, out, staging, site, cfg, inv, ann, index, ledger, processes, overwrite,
                      {"synthetic_export": synthetic, "public_demo_secret": public_secret}, engine)
    except OSError as e:
        if e.errno in _DISK_FULL:
            raise DiskFullError(f"disk full while writing {staging} ({os.strerror(e.errno)}); free space and "
                                f"run again: decoded files there are reused, and {out} was not touched") from None
        raise


def _account_tables(inv: Inventory, ann, index, ledger: Ledger) -> None:
    """Inventory rejects, ignored files and unusable table rows go into the ledger before decoding."""
    for rel, reason, detail in inv.rejected:
        ledger.quarantine(rel, reason, detail)
    for rel, why in inv.ignored:
        ledger.ignored(rel, why)
    for label, reason, detail in ann.quarantine:
        ledger.quarantine("annotations.csv", reason, detail, label=label)
    for kind, value in ann.identifiers:
        ledger.identifier(kind, value)
    ledger.used("annotations.csv")
    if index is None:
        print("note: no ecg_index.csv; ECG patient and date come from the WFDB headers")
        return
    ledger.used("ecg_index.csv")
    for kind, value in index.identifiers:
        ledger.identifier(kind, value)
    for label, reason, detail, rec in index.quarantine:
        ledger.quarantine("ecg_index.csv", reason, detail, label=label, record=rec)
    records = {h[:-4] for h in inv.headers} | set(inv.vendor)  # a vendor file is named with its extension
    for rec, label in sorted(index.row_of.items(), key=lambda x: x[1]):
        if rec not in records and rec not in index.invalid_records:
            ledger.quarantine("ecg_index.csv", E.ECG_INDEX_MISSING_FILE,
                              "the row names a record that is not in the export", label=label, record=rec)


def _decode_all(staging: Path, raw: Path, cfg: Config, inv: Inventory, processes: int | None,
                engine: str | None = None):
    """Decode every ECG and XA file with `engine` ("local": the process pool, default; "ray": Ray Data over
    the connected cluster); results in inventory order either way, so everything after is the same."""
    for sub in ("records", "views"):
        (staging / sub).mkdir(parents=True, exist_ok=True)
    d = cfg.data
    settings = DecodeSettings(
        raw=str(raw), staging=str(staging), contract=project_contract(d),
        min_valid_fraction=cfg.ingest.min_valid_fraction,
        frame_size=d.frame_size, key_frames=d.key_frames, limits=Limits.from_config(cfg.ingest),
    )
    ecg_jobs = [(h, settings) for h in inv.headers + inv.vendor]
    xa_jobs = [(p, settings) for p in inv.dicoms]

    def died(kind: str):
        return lambda job: {"kind": kind, "rel": job[0], "ok": False, "reason": E.DECODE_WORKER_DIED,
                            "detail": "the decoding process died (killed, or out of memory); the rest went on"}

    engine = engine or "local"
    if engine == "ray":
        return _decode_on_ray(staging, raw, inv, ecg_jobs, xa_jobs, died)
    if engine != "local":
        raise ValueError(f"unknown decode engine {engine!r}: 'local' or 'ray'")
    n_proc = processes if processes is not None else (cfg.ingest.processes or os.cpu_count() or 1)
    print(f"decode: local process pool, {n_proc} process(es)")
    jobs = [("ecg", j) for j in ecg_jobs] + [("xa", j) for j in xa_jobs]  # one pool: its workers start once
    out = run_jobs(decode_file, jobs, n_proc, "decode ECG + XA", lambda job: died(job[0])(job[1]))
    return out[: len(ecg_jobs)], out[len(ecg_jobs) :]


def _decode_on_ray(staging: Path, raw: Path, inv: Inventory, ecg_jobs: list, xa_jobs: list, died):
    """The decode jobs on the Ray cluster; every node must see the export and the staging folder at these
    paths (checked by each task against a token file written here, see ray_decode.py)."""
    import uuid

    # imports Ray when it runs, not before
    from stence.data.ray_decode import RayRunInfo, connect, run_jobs_ray

    nodes, cpus = connect()
    print(f"decode: Ray Data on a cluster of {nodes} node(s), {cpus:g} CPU(s)")
    probe = staging / "records" / ".shared-storage-probe"
    token = uuid.uuid4().hex
    probe.write_text(token, encoding="utf-8")
    must_see = {str(probe): token, str(raw / inv.annotations): None}
    info = RayRunInfo()
    try:
        ecg = run_jobs_ray(decode_ecg, ecg_jobs, "decode ECG", died("ecg"), must_see=must_see, info=info)
        xa = run_jobs_ray(decode_xa, xa_jobs, "decode XA", died("xa"), must_see=must_see, info=info)
    finally:
        probe.unlink(missing_ok=True)
    print(f"decode: jobs ran on {len(info.jobs_by_node)} of {info.cluster_nodes} node(s)"
          + (f"; {info.isolated} re-run alone after their worker died, {info.died} quarantined"
             if info.isolated else ""))
    return ecg, xa


def _build(raw, out, staging, site, cfg, inv, ann, index, ledger: Ledger, processes, overwrite,
           provenance: dict, engine: str | None = None) -> IngestReport:
    mark_output(staging, STAGING_KIND)
    ecg_res, xa_res = _decode_all(staging, raw, cfg, inv, processes, engine)
    for r in ecg_res + xa_res:
        for k, v in (r.get("identifiers") or {}).items():  # repeated elements come as tag_X, tag_X_2, ...
            ledger.identifier(f"{r['kind']}:{re.sub(r'_[0-9]+$', '', k)}", v)
        for uid in (r.get("study_uid"), r.get("sop_uid"), r.get("series_uid")):
            ledger.identifier("dicom:uid", uid)
    d = cfg.data
    ecgs = ecg_rows(ecg_res, index, ledger, d.fs)
    studies, views = study_rows(view_rows(xa_res, ledger), ann, ledger)
    pairs = pair(ecgs, studies, d.pair_window_days)
    paired_ecgs, paired_studies = {p["ecg_id"] for p in pairs}, {p["study_id"] for p in pairs}
    for e in ecgs:
        if e["ecg_id"] not in paired_ecgs:
            ledger.quarantine(e["_rel"], E.ECG_UNPAIRED, f"no angiography study of the patient within "
                              f"+/-{d.pair_window_days} days")
    for v in views:
        if v["study_id"] not in paired_studies:
            ledger.quarantine(v["_rel"], E.STUDY_UNPAIRED, "no ECG of the patient within "
                              f"+/-{d.pair_window_days} days of the study")
    ecgs = [e for e in ecgs if e["ecg_id"] in paired_ecgs]
    views = [v for v in views if v["study_id"] in paired_studies]
    _account_used(inv, ecg_res, ecgs, views, ledger)
    report = IngestReport(cohort=out, site_dir=site, n_files=len(inv.all_paths), ignored=len(inv.ignored),
                          public_secret=provenance["public_demo_secret"])
    if not pairs:
        _finish_without_cohort(staging, site, ledger, report)
        raise NothingUsableError(
            f"no usable ECG-angiography pair in {raw}; nothing was written to {out}. Quarantined: "
            + ", ".join(f"{k} {n}" for k, n in sorted(report.quarantined.items()))
            + f". Which file is which: {site / SITE_MAP}"
        )
    studies = studies[studies["study_id"].isin(paired_studies)].reset_index(drop=True)
    frames = [pd.DataFrame(ecgs), studies, pd.DataFrame(views), pd.DataFrame(pairs)]
    del ecg_res, xa_res, ecgs, views, pairs, studies  # per-record dicts: the frames hold what is still needed
    _write_cohort(staging, cfg, *frames, report, provenance)
    del frames  # before the leak scan, the last step with a peak of its own
    _write_quarantine_and_scan(staging, site, ledger, report)
    _publish(staging, out, overwrite)
    return report


def _account_used(inv: Inventory, ecg_res: list[dict], ecgs: list[dict], views: list[dict], ledger: Ledger) -> None:
    """Site-map rows for the files in the cohort, and for the signal files of every record: a signal file
    belongs to the record whose header names it (or shares its stem); one that belongs to none is
    quarantined as unrecognised."""
    for v in views:
        ledger.used(v["_rel"], v["view_id"])
    kept = {e["_rel"]: e for e in ecgs}
    status = {r["rel"]: r for r in ecg_res}
    owner: dict[str, str] = {}
    for r in ecg_res:
        folder = str(Path(r["rel"]).parent)
        for f in r.get("signal_files") or ():
            owner.setdefault(str(Path(folder) / f), r["rel"])
    stems = {(str(Path(h).parent), Path(h).name[:-4]): h for h in inv.headers}
    for rel, e in kept.items():
        ledger.used(rel, e["ecg_id"])
    for rel in inv.ecg_other:
        p = Path(rel)
        head = owner.get(rel) or stems.get((str(p.parent), p.name.split(".")[0])) or stems.get((str(p.parent), p.stem))
        if head is None:
            ledger.quarantine(rel, E.UNRECOGNISED_FILE, "under ecg/ but no WFDB header names it")
        elif head in kept:
            ledger.used(rel, kept[head]["ecg_id"])
        else:
            reason = status[head].get("reason") if head in status and not status[head]["ok"] else "record_not_used"
            ledger.follows(rel, f"signal file of a quarantined record ({reason})", head)


def _write_cohort(staging: Path, cfg: Config, ecgs: pd.DataFrame, studies: pd.DataFrame, views: pd.DataFrame,
                  pairs: pd.DataFrame, report: IngestReport, provenance: dict) -> None:
    """Splits by patient, caches and tables, cohort.json."""
    d = cfg.data
    split_of = stratified_patient_split(studies.groupby("patient")["max_stenosis"].max(), d.split_fractions,
                                        d.split_seed)
    manifest = pairs.merge(studies[["study_id", "max_stenosis", "n_views"] + [f"t_{n}" for n in TARGET_NAMES]],
                           on="study_id")
    manifest = manifest.merge(ecgs[["ecg_id", "age", "sex", "fs_orig", "n_samples"]], on="ecg_id")
    manifest["split"] = manifest["patient"].map(split_of)
    manifest = manifest.sort_values("pair_id").reset_index(drop=True)
    check_no_leakage(manifest)
    ecgs = ecgs.sort_values("ecg_id").reset_index(drop=True)
    ecgs["split"] = ecgs["patient"].map(split_of)
    views = views.sort_values(["study_id", "view_id"]).reset_index(drop=True)
    cohort_io.write_ecg_cache(staging, ecgs)
    cohort_io.write_frame_cache(staging, views, d.key_frames, d.frame_size)
    studies["split"] = studies["patient"].map(split_of)
    tables = {"manifest": manifest, "ecgs": ecgs.drop(columns=["array", "source_array", "date"]), "studies": studies.drop(columns=["date"]),
              "views": views.drop(columns=["array", "date"])}
    for name, df in tables.items():
        cohort_io.write_table(staging / f"{name}.parquet", drop_private(df))
    report.fingerprint = cohort_io.fingerprint(staging)
    report.n_ecgs, report.n_studies, report.n_views = len(ecgs), len(studies), len(views)
    report.n_pairs, report.n_patients = len(manifest), manifest["patient"].nunique()
    meta = {
        "fingerprint": report.fingerprint,
        "created_unix": int(dt.datetime.now(dt.timezone.utc).timestamp()),
        "data_config": to_dict(cfg.data),
        "counts": {"patients": report.n_patients, "ecgs": report.n_ecgs, "studies": report.n_studies,
                   "views": report.n_views, "pairs": report.n_pairs},
        "splits": manifest.groupby("split")["patient"].nunique().to_dict(),
        "pairs_by_split": manifest["split"].value_counts().to_dict(),
        "ages": "ages above 89 are written as 90 (90 or older)",
        **provenance,  # a synthetic export pseudonymised with the public demo secret says so
    }
    (staging / "cohort.json").write_text(json.dumps(meta, indent=2, default=str))


def _write_site_map(site: Path, ledger: Ledger) -> None:
    mark_output(site, SITE_KIND)
    (site / "README.txt").write_text(
        "SITE ONLY - HOLDS IDENTIFIERS. Original paths of the export (folder and file names may carry MRNs,\n"
        "accession numbers and dates) by the pseudonym the cohort uses for each file. Keep it at the site;\n"
        "never copy it into the cohort, a run or a report.\n")
    ledger.site_frame().to_csv(site / SITE_MAP, index=False)


def _write_quarantine(staging: Path, site: Path, ledger: Ledger, report: IngestReport) -> None:
    """quarantine.parquet with identifiers redacted from the details, and the site-side map."""
    q, report.redacted = ledger.quarantine_frame()
    report.quarantined = Counter(q["reason"])
    cohort_io.write_table(staging / "quarantine.parquet", q)
    _write_site_map(site, ledger)


def _scan(files: list[Path], staging: Path, ledger: Ledger, report: IngestReport) -> None:
    """The leak scan of what was written; a hit the redaction could not explain stops here (one line,
    naming the file and the kind of identifier, never its value)."""
    hits = scan_files_for(files, ledger.needles)
    report.identifier_hits, report.identifiers_scanned = len(hits), len(ledger.needles)
    if hits:
        what = sorted({f"{Path(f).name} ({ledger.needles[n]})" for f, n in hits})
        raise IdentifierLeakError(f"de-identification check failed: identifiers in {', '.join(what)}; nothing "
                                  f"was published (staging left at {staging})")


def _write_quarantine_and_scan(staging: Path, site: Path, ledger: Ledger, report: IngestReport) -> None:
    """Quarantine, site map and deid_report.json, then the leak scan of every file in the cohort."""
    _write_quarantine(staging, site, ledger, report)
    finals = [p for p in staging.rglob("*") if p.is_file() and p.name != MARKER
              and p.parent.name not in ("records", "views")]
    deid = {
        "salted_pseudonyms": ["patient", "ecg", "study", "view", "file"],
        "identifier_kinds_found": dict(sorted(Counter(ledger.needles.values()).items())),
        "redacted_from_quarantine_details": dict(sorted(report.redacted.items())),
        "dates": "absolute dates dropped; only ECG-to-angiogram offsets (delta_days) are kept",
        "paths": "no original file or folder name is written; files are referred to by pseudonym",
        "scanned_files": len(finals) + 1,
        "identifier_values_scanned": len(ledger.needles),
    }
    (staging / "deid_report.json").write_text(json.dumps(deid, indent=2))
    _scan(finals + [staging / "deid_report.json"], staging, ledger, report)
    deid["hits"] = report.identifier_hits  # a number, added once the scan of this file passed
    (staging / "deid_report.json").write_text(json.dumps(deid, indent=2))


def _finish_without_cohort(staging: Path, site: Path, ledger: Ledger, report: IngestReport) -> None:
    """Nothing paired: the quarantine goes into the staging folder (scanned like a cohort) and the site map;
    no cohort is written or replaced."""
    _write_quarantine(staging, site, ledger, report)
    _scan([staging / "quarantine.parquet"], staging, ledger, report)


def _publish(staging: Path, out: Path, overwrite: bool) -> None:
    """Drop the per-file intermediates and swap the finished staging folder into place. Only folders that
    carry a cohort marker are ever moved aside or removed."""
    shutil.rmtree(staging / "records", ignore_errors=True)
    shutil.rmtree(staging / "views", ignore_errors=True)
    check_output(out, COHORT_KIND, overwrite=overwrite)  # again: it may have changed while decoding
    old = out.with_name(out.name + ".old")
    if old.exists():
        if output_kind(old) != COHORT_KIND:
            raise OutputRefused(f"{old} exists and is not an earlier stence cohort; move it away first")
        shutil.rmtree(old)
    mark_output(staging, COHORT_KIND)
    if out.exists():
        os.replace(out, old)
    os.replace(staging, out)
    if old.exists():
        shutil.rmtree(old)
