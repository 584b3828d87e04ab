"""`stence scaler convert`: EchoingECG's pickled scaler (`ecg_scaler.pkl`) to the JSON `model.ecg_scaler` reads.

The pickle is read with an allow-listing unpickler: only a scikit-learn StandardScaler and its numpy arrays
are accepted, scikit-learn is never imported and nothing in the file runs; anything else is refused."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from stence.commands._common import RAW

EXAMPLE = """example:
  stence scaler convert /models/echoingecg/ecg_scaler.pkl --out /models/echoingecg/scaler.json
  stence pretrain --set model.ecg=echoingecg model.ecg_checkpoint=/models/echoingecg/echoingecg.pt \\
      model.ecg_scaler=/models/echoingecg/scaler.json"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("scaler", help="convert EchoingECG's ecg_scaler.pkl to JSON (no code from it runs)",
                       description=__doc__, epilog=EXAMPLE, formatter_class=RAW)
    p.set_defaults(func=lambda _args: p.print_help() or 2)
    actions = p.add_subparsers(dest="scaler_command", metavar="ACTION")
    c = actions.add_parser("convert", help="pickled StandardScaler -> scaler JSON",
                           description=__doc__, epilog=EXAMPLE, formatter_class=RAW)
    c.add_argument("pickle", help="the StandardScaler pickle (pickle.dump or joblib.dump, optionally compressed)")
    c.add_argument("--out", required=True, help="JSON file to write (point model.ecg_scaler at it)")
    c.add_argument("--lead-order", default=None, metavar="ORDER",
                   help="record the lead each entry belongs to: standard, mimic, or comma-separated names "
                   "(default: the pickle's feature names if it has them, else none recorded)")
    c.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    c.set_defaults(func=run)


def _lead_order(value: str | None) -> list[str] | None:
    from stence.models.base import LEAD_ORDERS

    if not value:
        return None
    return list(LEAD_ORDERS[value]) if value in LEAD_ORDERS else [s.strip() for s in value.split(",")]


def run(args: argparse.Namespace) -> int:
    from stence.models.safe_load import CheckpointError, load_scaler, read_scaler_pickle, write_scaler_json

    src, out = Path(args.pickle), Path(args.out)
    tmp = out.with_name(out.stem + ".tmp.json")
    if out.suffix.lower() != ".json":
        print(f"refused: --out {out} must end in .json (the format model.ecg_scaler reads)", file=sys.stderr)
        return 2
    if out.resolve() == src.resolve():
        print(f"refused: --out {out} is the input file", file=sys.stderr)
        return 2
    if out.exists() and not args.overwrite:
        print(f"refused: {out} exists; pass --overwrite to replace it", file=sys.stderr)
        return 2
    leads = _lead_order(args.lead_order)
    try:
        attrs = read_scaler_pickle(src)
        n = len(attrs["mean_"])
        if leads is not None and len(leads) != n:
            raise CheckpointError(f"--lead-order names {len(leads)} leads, the scaler has {n} entries")
        write_scaler_json(tmp, attrs, lead_order=leads)
        load_scaler(tmp, n_features=n)  # what was written is what model.ecg_scaler accepts
        tmp.replace(out)
    except (CheckpointError, FileNotFoundError) as e:
        tmp.unlink(missing_ok=True)
        print(f"refused: {e}", file=sys.stderr)
        return 1
    print(f"wrote {out}: {n} leads, mean_ and scale_ of a StandardScaler"
          + (f" (scikit-learn {attrs['sklearn_version']})" if "sklearn_version" in attrs else ""))
    return 0
