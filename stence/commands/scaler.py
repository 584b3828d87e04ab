"""`stence scaler convert`: EchoingECG's pickled scaler (`ecg_scaler.pkl`) to the JSON `model.ecg_scaler` reads.

The pickle is read with an allow-listing unpickler: only a scikit-learn StandardScaler and its numpy arrays
are accepted, scikit-learn is never imported and nothing in the file runs; anything else is refused."""

from __future__ import annotations

import argparse
import sys

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


def run(args: argparse.Namespace) -> int:
    # the pipeline pulls in torch: imported here so `stence --help` stays fast
    from stence.pipelines.scaler import ScalerRefused, convert_scaler

    try:
        done = convert_scaler(args.pickle, args.out, args.lead_order, args.overwrite)
    except ScalerRefused as e:  # nothing written: 2 for a refused --out, 1 for a refused pickle
        print(f"refused: {e}", file=sys.stderr)
        return e.code
    print(f"wrote {done.out}: {done.n_leads} leads, mean_ and scale_ of a StandardScaler"
          + (f" (scikit-learn {done.sklearn_version})" if done.sklearn_version is not None else ""))
    return 0
