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
import json
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from tqdm import tqdm

from stence.config import STANDARD_LEADS
from stence.data.labels import SEGMENTS, max_degree
from stence.data.synth_corrupt import plant_corrupt
from stence.data.synth_echonext import write_echonext

# the plan, the records and the writers live in their own modules; these names are imported from here too
from stence.data.synth_plan import (
    MAX_DEGREE_LEVELS,
    SynthConfig,
    make_record,
    plan_patients,
    rng_for,
    write_study,
    xa_meta,
)
from stence.data.synth_records import EcgRecord, Patient
from stence.data.synth_vendor import person_for, record_format, write_ecg, write_record, write_record_wfdb
from stence.outputs import check_output, mark_output

TRUTH_FILE = "synth_truth.json"


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


def _csv_writer(fh: IO[str], header: list[str]) -> Any:
    """A csv writer on `fh` (Unix line ends) that has written `header`."""
    w = csv.writer(fh, lineterminator="\n")
    w.writerow(header)
    return w


def _truth_item(patient: dict[str, Any], first: bool) -> str:
    """One entry of the answer key's "patients" list, as json.dumps(truth, indent=1, sort_keys=True) writes
    it at depth 2 (JSON strings hold no raw newline, so indenting every line break is exact)."""
    return ("" if first else ",") + "\n  " + json.dumps(patient, indent=1, sort_keys=True).replace("\n", "\n  ")


def _write_truth(path: Path, truth: dict[str, Any], patients: IO[str]) -> None:
    """Write `truth` with its "patients" list read from `patients` (the `_truth_item`s): the same bytes as
    json.dumps({**truth, "patients": [...]}, indent=1, sort_keys=True) + newline, the list never in memory."""
    head = json.dumps({**truth, "patients": []}, indent=1, sort_keys=True)
    empty = '"patients": []\n}'
    if not head.endswith(empty):  # "patients" sorts last among the answer key's keys
        raise RuntimeError("answer key layout changed: patients is not its last key")
    with open(path, "w") as fh:
        fh.write(head[: -len(empty)] + '"patients": [')
        first = patients.read(1)
        if first:
            fh.write(first)
            shutil.copyfileobj(patients, fh)
            fh.write("\n ]\n}\n")
        else:
            fh.write("]\n}\n")


def write_cohort(
    out: Path, cfg: SynthConfig, *, progress: bool = False, overwrite: bool = False
) -> SynthSummary:
    """Write the whole synthetic cohort under `out` (see the module docstring); returns the counts.

    `out` must be new, empty, or (with `overwrite`) this function's own earlier output, recognised by its
    marker (stence/outputs.py); anything else raises `OutputRefused` and leaves the folder untouched."""
    t0 = time.perf_counter()
    out = Path(out)
    _prepare(out, overwrite)
    patients = plan_patients(cfg, cfg.patients)
    n_record = 0
    # the index, annotation and answer-key rows go to disk patient by patient (nothing per record is kept:
    # a bench-size cohort's rows and the answer key's JSON text would otherwise grow with the cohort)
    with (
        open(out / "ecg_index.csv", "w", newline="") as index_fh,
        open(out / "annotations.csv", "w", newline="") as annotation_fh,
        tempfile.TemporaryFile("w+", dir=out) as truth_fh,  # unlinked: leaves nothing behind
    ):
        index_csv = _csv_writer(index_fh, ["record", "patient_id", "acquisition_date"])
        annotation_csv = _csv_writer(annotation_fh, ["study_uid", "segment", "stenosis"])
        for k, p in enumerate(tqdm(patients, desc="synth cohort", unit="patient", disable=not progress)):
            ecgs = []
            for j in range(cfg.ecgs_per_patient):
                rec = make_record(cfg, p, f"E{n_record:06d}", j)
                fmt = record_format(cfg.ecg_format, cfg.seed, n_record)  # its own stream: the rest is unchanged
                n_record += 1
                rel = "ecg/" + write_ecg(out / "ecg", rec, fmt, person_for(p))  # WFDB without extension
                index_csv.writerow([rel, p.patient_id, rec.when.date().isoformat()])
                ecgs.append({"record": rel, "format": fmt, "date": rec.when.date().isoformat(), "fs": rec.fs,
                             "leads_shuffled": rec.leads != STANDARD_LEADS})  # fmt: skip
            views = write_study(out, cfg, p)
            annotation_csv.writerows([[p.study_uid, s, p.segments[s]] for s in SEGMENTS])
            truth_fh.write(_truth_item(_truth_patient(p, views, ecgs), first=k == 0))

        # the corrupt files' rows come after the good ones, as before
        corrupt_index: list[list[Any]] = []
        corrupt_annotations: list[list[Any]] = []
        corrupt = (
            plant_corrupt(out, cfg, patients, n_record, corrupt_index, corrupt_annotations)
            if cfg.corrupt_fraction
            else []
        )
        index_csv.writerows(corrupt_index)
        annotation_csv.writerows(corrupt_annotations)
        echonext = write_echonext(out / "echonext", cfg.echonext, cfg.seed, cfg.noise) if cfg.echonext else {}
        truth = {
            "params": {**dataclasses.asdict(cfg), "fs": list(cfg.fs), "generator": "stence.data.synth"},
            "corrupt": corrupt,
            "echonext": echonext,
        }
        truth_fh.seek(0)
        _write_truth(out / TRUTH_FILE, truth, truth_fh)
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
