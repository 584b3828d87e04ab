"""`stence features`: encode every angiography view once into the cached patch features (Ray Data)."""

from __future__ import annotations

import argparse

from stence.commands._common import RAW, add_config_args, config_from_args

EXAMPLE = """example:
  stence features --set data.cohort=runs/cohort feature.variants=2
  stence features --set feature.frame_encoder=dinov2_vits14 feature.frame_checkpoint=/models/dinov2_vits14.pth \\
      feature.image_size=518 feature.feature_dim=512      # the paper's encoder, local weights"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("features", help="cache angiography patch features (Ray Data, resumable)",
                       description=__doc__, epilog=EXAMPLE, formatter_class=RAW)
    add_config_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    # the pipeline (stence.train.features) pulls in pandas and Ray Data: imported here so `stence --help` is fast
    from stence.train.features import extract_features

    cfg = config_from_args(args)
    store = extract_features(cfg)
    print(f"features: {store.root} shape {tuple(store.feats.shape)} (views, variants, patches, dim)")
    return 0
