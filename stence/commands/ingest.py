"""`stence ingest RAW --out COHORT`: raw export -> pseudonymised cohort."""

from __future__ import annotations

import argparse

from stence.commands._common import RAW, add_config_args, config_from_args

EXAMPLE = """example:
  export STENCE_SALT=<site secret>        # keyed pseudonyms; never stored in the cohort
  stence ingest runs/raw --out runs/cohort --set data.fs=500 data.pair_window_days=30

RAW layout: ecg/**.hea (WFDB), ecg_index.csv (record,patient_id,acquisition_date),
angio/** (DICOM XA views), annotations.csv (study_uid,segment,stenosis)."""


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ingest", help="build a pseudonymised cohort from a raw export", description=__doc__,
                       epilog=EXAMPLE, formatter_class=RAW)
    p.add_argument("raw", help="raw export folder")
    p.add_argument("--out", required=True, help="cohort folder to write (built atomically)")
    p.add_argument("--processes", type=int, default=None, help="decode processes (default: all cores)")
    add_config_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from stence.data.ingest import NothingUsableError, ingest
    from stence.data.pseudonym import SaltError

    cfg = config_from_args(args)
    try:
        report = ingest(args.raw, args.out, cfg, processes=args.processes)
    except (NothingUsableError, SaltError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}")
        return 1
    print(report.summary())
    print(f"  quarantine details: {report.cohort}/quarantine.parquet; de-identification: "
          f"{report.cohort}/deid_report.json")
    return 0
