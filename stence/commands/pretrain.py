"""`stence pretrain`: stage B, StenCE contrastive pretraining on Ray Train (DDP over --workers)."""

from __future__ import annotations

import argparse

from stence.commands._common import RAW, add_config_args, add_run_args, config_from_args

EXAMPLE = """example:
  stence pretrain --config my.yaml --workers 4 --gpus 1 --set loss.w_sten=0.3 model.angio_checkpoint=runs/.../aggregator.pt
A crash resumes from the last checkpoint; running again with the same train.name resumes the run."""


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("pretrain", help="stage B: StenCE pretraining (Ray Train, DDP)", description=__doc__,
                       epilog=EXAMPLE, formatter_class=RAW)
    add_config_args(p)
    add_run_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    # the pipeline pulls in torch, Ray and MLflow: imported here so `stence --help` stays fast
    from stence.pipelines.pretrain import run_pretrain

    out = run_pretrain(config_from_args(args))
    m = out["metrics"]
    print(f"stage B: exported epoch {m.get('epoch', '?')}: smoothed kNN AUROC "
          f"{m.get('val/knn_auroc_smooth', float('nan')):.3f} (that epoch's {m.get('val/knn_auroc', float('nan')):.3f})")
    print(f"StenCE model: {out['checkpoint']}\nECG encoder:  {out['encoder']}")
    return 0
