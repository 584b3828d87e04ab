"""`stence embed RECORD... --out FILE.npz`: ECG embeddings under the encoder's own input contract."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from stence.commands._common import RAW, add_config_args, config_from_args

if TYPE_CHECKING:
    from stence.models.base import ECGEncoder

EXAMPLE = """examples:
  stence embed --set model.ecg=otis_base model.ecg_checkpoint=otis_base.pth -- ecgs/*.hea --out otis.npz
  stence embed --set model.ecg=echoingecg model.ecg_checkpoint=echoingecg.pt \\
               model.ecg_scaler=scaler.json -- ecgs/ --out echo.npz
  stence embed --model models:/stence-ecg-encoder@champion -- ecgs/ --out champion.npz

The encoder is the configured one (model.ecg, with public weights from model.ecg_checkpoint; model.contract
picks its input contract: auto = the backbone's upstream contract when weights are given) or, with --model,
the encoder of a registered model or scorer file under the contract stored with it. Each record is read at
its own rate and lead order and prepared by the contract (its first window, as in evaluation). A folder
stands for every record under it. FILE.npz holds `embeddings` (N, D) float32, `records` (N,), `contract`
(JSON) and `failed_records` / `failed_reasons`; it loads with numpy.load(..., allow_pickle=False).
Exit code 0 if every record was embedded, 1 if any failed; an existing FILE is replaced only with
--overwrite, and never when it is one of the inputs."""


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("embed", help="ECG embeddings of records under the encoder's input contract",
                       description=__doc__, epilog=EXAMPLE, formatter_class=RAW)
    p.add_argument("records", nargs="+", metavar="RECORD", help="ECG records or folders of them")
    p.add_argument("--out", required=True, type=Path, metavar="FILE.npz", help="where to write the embeddings")
    p.add_argument("--model", default=None, help="models:/NAME@ALIAS, models:/NAME/VERSION, runs:/RUN_ID or a "
                   "scorer.pt (default: the configured model.ecg)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing FILE.npz")
    add_config_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    # the pipeline pulls in torch and MLflow: imported here so `stence --help` stays fast
    from stence.pipelines.embed import EmbedRefused, embed_pipeline

    try:
        done = embed_pipeline(cfg, args.records, args.out, args.model, args.overwrite, on_encoder=_print_encoder)
    except EmbedRefused as e:  # nothing embedded, nothing written
        print(f"error: {e}")
        return 1
    result = done.result
    for record, _, error in result.failed:
        print(f"{record}  ERROR {error}")
    print(f"embedded {len(result.records)} of {len(done.records)} record(s) -> {done.out} "
          f"({result.embeddings.shape[0]} x {result.embeddings.shape[1]} float32)")
    return 0 if not result.failed else 1


def _print_encoder(encoder: ECGEncoder) -> None:
    print(f"encoder {encoder.arch.get('name')}, input contract {encoder.contract.describe()}", file=sys.stderr)
