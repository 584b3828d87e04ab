"""`stence ingest RAW --out COHORT`: raw export -> pseudonymised cohort."""

from __future__ import annotations

import argparse
import sys

from stence.commands._common import RAW, add_config_args, config_from_args

EXAMPLE = """example:
  export STENCE_SALT=<site secret>        # keyed pseudonyms; never stored in the cohort
  stence ingest runs/raw --out runs/cohort --set data.fs=500 data.pair_window_days=30
  stence ingest runs/raw --out runs/cohort --overwrite     # replace an earlier cohort in runs/cohort
  RAY_ADDRESS=head:6379 stence ingest /shared/raw --out /shared/cohort   # decode on the Ray cluster's nodes

RAW layout: ecg/** (WFDB .hea + signal files, or GE MUSE / Philips / HL7 aECG XML and DICOM ECG exports,
recognised by content), ecg_index.csv (record,patient_id,acquisition_date; optional for files that carry
their own patient ID and date),
angio/** (DICOM XA views), annotations.csv (study_uid,segment,stenosis). Every file is used or
quarantined with a reason; the map of file pseudonyms to original paths (identifiers: site only) goes to
COHORT.site-identifiers/ (ingest.site_dir).

Decoding runs in a local process pool, or with --ray (or RAY_ADDRESS set and no --processes) with Ray Data
on every node of the Ray cluster: RAW and --out must then be on storage every node mounts at the same path
(object storage is not supported yet). Both engines give the same cohort fingerprint."""


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ingest", help="build a pseudonymised cohort from a raw export", description=__doc__,
                       epilog=EXAMPLE, formatter_class=RAW)
    p.add_argument("raw", help="raw export folder (read only: nothing is written inside it)")
    p.add_argument("--out", required=True, help="cohort folder to write: new, empty, or an earlier cohort "
                   "with --overwrite (built beside it and renamed into place when complete)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier cohort in --out")
    p.add_argument("--processes", type=int, default=None, help="decode processes of the local pool (default: "
                   "all cores); giving it keeps decoding on this machine even with RAY_ADDRESS set")
    p.add_argument("--ray", action="store_true", help="decode with Ray Data on the cluster at RAY_ADDRESS (a "
                   "local Ray instance when unset); RAW and --out on storage every node mounts")
    add_config_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    # the pipeline pulls in pandas and the DICOM/WFDB readers: imported here so `stence --help` stays fast
    from stence.pipelines.ingest import INGEST_ERRORS, ingest_cohort

    try:
        report = ingest_cohort(cfg, args.raw, args.out, processes=args.processes, overwrite=args.overwrite,
                               ray=args.ray)
    except INGEST_ERRORS as e:  # refused with one line; nothing outside the staging and site folders written
        print(f"stence ingest: {e}", file=sys.stderr)
        return 1
    print(report.summary())
    print(f"  quarantine details: {report.cohort}/quarantine.parquet; de-identification: "
          f"{report.cohort}/deid_report.json")
    return 0
