"""`stence synth OUT`: write a synthetic cohort laid out like a hospital export."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from stence.commands._common import RAW
from stence.data.synth import SynthConfig, write_cohort
from stence.data.synth_vendor import ECG_FORMATS
from stence.outputs import OutputRefused

EXAMPLES = """\
examples:
  stence synth runs/raw                                  # demo size: 120 patients, 240 ECGs, 360 views
  stence synth runs/tiny --size tiny --corrupt-fraction 0.1 --compression rle
  stence synth runs/mixed --patients 200 --fs 500 250 1000 --echonext 1000 --seed 3
  stence synth runs/vendor --size tiny --ecg-format mixed   # GE MUSE, HL7 aECG, DICOM and WFDB ECGs
  then: stence ingest runs/raw --out runs/cohort
"""

# command-line flag -> SynthConfig field, for the flags that override the --size preset
_OVERRIDES = {
    "patients": "patients",
    "ecgs_per_patient": "ecgs_per_patient",
    "views": "views",
    "frames": "frames",
    "image_size": "image_size",
    "fs": "fs",
    "duration": "duration_s",
    "ecg_effect": "ecg_effect",
    "noise": "noise",
    "corrupt_fraction": "corrupt_fraction",
    "compression": "compression",
    "echonext": "echonext",
    "ecg_format": "ecg_format",
    "seed": "seed",
}


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register `stence synth`."""
    p = subparsers.add_parser(
        "synth",
        help="write a synthetic cohort (WFDB ECGs, XA DICOM, annotations, optional EchoNext layout)",
        description=(
            "Write a synthetic paired ECG-angiography cohort in real file formats (WFDB, DICOM XA, CSV).\n"
            "Angiography carries the stenosis signal strongly, the ECG weakly. The same seed gives\n"
            "byte-identical files. synth_truth.json is the answer key for tests; ingest never reads it.\n"
            "Flags given explicitly override the --size preset."
        ),
        epilog=EXAMPLES,
        formatter_class=RAW,
    )
    p.add_argument("out", metavar="OUT", type=Path,
                   help="output folder: new or empty, or an earlier `stence synth` output with --overwrite")
    p.add_argument("--size", choices=("tiny", "demo", "bench"), default="demo", help="preset (default: demo)")
    p.add_argument("--patients", type=int, metavar="N", help="patients, one angiography study each")
    p.add_argument("--ecgs-per-patient", type=int, metavar="N", help="good ECGs per patient")
    p.add_argument("--views", type=int, metavar="V", help="DICOM views per study")
    p.add_argument("--frames", type=int, metavar="F", help="frames per view")
    p.add_argument("--image-size", type=int, metavar="PX", help="frame size in pixels")
    p.add_argument("--fs", type=int, nargs="+", metavar="HZ", help="ECG sampling rate(s); records pick one")
    p.add_argument("--duration", type=float, metavar="S", help="ECG length in seconds")
    p.add_argument("--ecg-effect", type=float, metavar="X", help="strength of the stenosis effect on the ECG")
    p.add_argument("--noise", type=float, metavar="X", help="noise level of ECGs and frames")
    p.add_argument("--corrupt-fraction", type=float, metavar="X", help="plant corrupt files (0 = none)")
    p.add_argument("--compression", choices=("none", "rle"), help="DICOM transfer syntax")
    p.add_argument("--echonext", type=int, metavar="N", help="ECGs in an EchoNext-format folder (0 = none)")
    p.add_argument("--ecg-format", choices=ECG_FORMATS,
                   help="ECG files: wfdb (default, .hea + .dat), muse (GE MUSE XML), hl7 (HL7 aECG XML), dicom "
                        "(DICOM 12-lead ECG), or mixed (one drawn per record; signals, dates and pairings stay "
                        "those of the wfdb export). Vendor files carry names, MRN, birth date, physician and "
                        "site, which ingest must de-identify")
    p.add_argument("--seed", type=int, metavar="S", help="random seed")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an earlier `stence synth` output in OUT (never a folder synth did not write)")
    p.set_defaults(func=run)


def synth_config_from_args(args: argparse.Namespace) -> SynthConfig:
    """The --size preset with every given flag applied on top."""
    changes = {
        field: getattr(args, flag) for flag, field in _OVERRIDES.items() if getattr(args, flag) is not None
    }
    if "fs" in changes:
        changes["fs"] = tuple(changes["fs"])
    base = SynthConfig.preset(args.size)
    return dataclasses.replace(base, **changes)


def run(args: argparse.Namespace) -> int:
    """Write the cohort and print its summary."""
    try:
        cfg = synth_config_from_args(args)
        summary = write_cohort(args.out, cfg, progress=True, overwrite=args.overwrite)
    except (OutputRefused, ValueError) as e:
        print(f"stence synth: {e}", file=sys.stderr)
        return 2
    print(summary.format())
    return 0
