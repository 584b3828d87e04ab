"""`stence probe` / `stence finetune`: stage C on threshold tasks (or EchoNext), with 95 % bootstrap CIs."""

from __future__ import annotations

import argparse
import json
import sys

from stence.commands._common import RAW, add_config_args, add_run_args, config_from_args
from stence.outputs import OutputRefused

EXAMPLE = """example:
  stence {cmd} --encoder runs/ray/exports/pretrain-stence/encoder.pt --tasks 0_100 0_90 lt70_ge70 le50_ge99
  stence {cmd} --tasks 0_100 --label baseline                      # random-init baseline
  stence {cmd} --compare results/a.json results/b.json --out results/compare   # Fig. 2 + table of several models"""


def _add(sub: argparse._SubParsersAction, cmd: str) -> None:
    p = sub.add_parser(cmd, help=f"stage C: {'linear probe' if cmd == 'probe' else 'fine-tune'} an ECG encoder",
                       description=__doc__, epilog=EXAMPLE.format(cmd=cmd), formatter_class=RAW)
    p.add_argument("--encoder", default="", help="encoder.pt, stence.pt, scorer.pt or a registered model "
                   "(models:/stence-ecg-encoder@champion); default: the configured baseline")
    p.add_argument("--tasks", nargs="+", default=None, help="threshold tasks (default: downstream.task)")
    p.add_argument("--label", default=None, help="model name in tables and plots")
    p.add_argument("--out", default=None,
                   help="folder for results.json/.md and the Fig. 2 plot: new or empty, or an earlier results "
                   "folder with --overwrite (default: exports/results-LABEL, or runs/results/compare with "
                   "--compare; replaced on a re-run)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the earlier results in --out (never a folder stence did not write)")
    p.add_argument("--compare", nargs="+", default=None, metavar="RESULTS_JSON",
                   help="only merge earlier results files into one table and Fig. 2")
    add_config_args(p)
    add_run_args(p)
    p.set_defaults(func=run, mode=cmd)


def add_parser(sub: argparse._SubParsersAction) -> None:
    _add(sub, "probe")
    _add(sub, "finetune")


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    # the pipelines pull in torch, Ray and MLflow: imported here so `stence --help` stays fast
    from stence.pipelines.compare import compare_files
    from stence.pipelines.downstream import probe_pipeline

    try:
        if args.compare:
            done = compare_files(cfg, args.compare, args.out, args.overwrite)
        else:
            evaluation = probe_pipeline(cfg, args.mode, args.encoder, args.tasks, args.label, args.out,
                                        args.overwrite, report=_print_task)
    except OutputRefused as e:  # an output folder it must not write: one line, nothing touched
        print(f"stence {args.mode}: {e}", file=sys.stderr)
        return 2
    if args.compare:
        print(done.md.read_text())
        if done.run_id:
            print(f"MLflow comparison run {done.run_id} (linked to the evaluation runs it compared)")
        return 0
    print(f"results: {evaluation.results_json}\n{json.dumps(str(evaluation.results_md))}")
    if evaluation.run_id:
        print(f"MLflow evaluation run {evaluation.run_id} (one nested run per task)")
    return 0


def _print_task(label: str, task: str, r: dict) -> None:
    """One line per task as it finishes: AUROC with its 95 % CI, AUPRC, counts."""
    if r:
        print(f"{label} {task}: AUROC {r['auroc']:.3f} [{r['auroc_lo']:.3f}, {r['auroc_hi']:.3f}] "
              f"AUPRC {r['auprc']:.3f} (n={r['n']}, positives {r['n_pos']})")
