"""`stence train-angio`: stage A, the angiography stenosis model (aggregator on cached features)."""

from __future__ import annotations

import argparse

from stence.commands._common import RAW, add_config_args, add_run_args, config_from_args

EXAMPLE = """example:
  stence train-angio --set data.cohort=runs/cohort optim.epochs=20 --workers 2
Then initialise stage B from it: --set model.angio_checkpoint=<printed aggregator.pt>"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train-angio", help="stage A: train the angiography stenosis model",
                       description=__doc__, epilog=EXAMPLE, formatter_class=RAW)
    add_config_args(p)
    add_run_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    # the pipeline pulls in torch, Ray and MLflow: imported here so `stence --help` stays fast
    from stence.pipelines.angio import run_angio

    out = run_angio(config_from_args(args))
    m = out["metrics"]
    print(f"stage A: best val AUROC patient {m.get('val/auroc_patient', float('nan')):.3f}, "
          f"artery {m.get('val/auroc_artery', float('nan')):.3f}, segment {m.get('val/auroc_segment', float('nan')):.3f}")
    print(f"aggregator: {out['checkpoint']}")
    if out.get("frame_encoder"):
        print(f"frame encoder: {out['frame_encoder']}  (stage B: --set feature.frame_checkpoint=<this>)")
    return 0
