"""`stence probe` / `stence finetune`: stage C on threshold tasks (or EchoNext), with 95 % bootstrap CIs."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from stence.commands._common import RAW, add_config_args, add_run_args, config_from_args

EXAMPLE = """example:
  stence {cmd} --encoder runs/ray/exports/pretrain-stence/encoder.pt --tasks 0_100 0_90 lt70_ge70 le50_ge99
  stence {cmd} --tasks 0_100 --label baseline                      # random-init baseline
  stence {cmd} --compare results/a.json results/b.json --out results/compare   # Fig. 2 + table of several models"""
DEFAULT_COMPARE_OUT = "runs/results/compare"


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
    from stence.outputs import OutputRefused

    try:
        return _compare(args) if args.compare else _probe(args)
    except OutputRefused as e:  # an output folder it must not write: one line, nothing touched
        print(f"stence {args.mode}: {e}", file=sys.stderr)
        return 2


def _results_out(args: argparse.Namespace, default: Path) -> tuple[Path, bool]:
    """(results folder, overwrite): a default folder is the command's own and is replaced on a re-run; an
    explicit --out must be new or empty, or an earlier results folder with --overwrite."""
    return (Path(args.out), args.overwrite) if args.out else (default, True)


def _compare(args: argparse.Namespace) -> int:
    from stence.eval.report import RESULTS_KIND, claim_results, read_results
    from stence.outputs import check_output
    from stence.pipelines.compare import compare

    out, overwrite = _results_out(args, Path(DEFAULT_COMPARE_OUT))
    check_output(out, RESULTS_KIND, args.compare, overwrite)  # before reading anything
    merged: dict = {}
    for f in args.compare:
        merged.update(read_results(f))
    done = compare(config_from_args(args), merged, claim_results(out, args.compare, overwrite))
    print(Path(done["md"]).read_text())
    if done["run_id"]:
        print(f"MLflow comparison run {done['run_id']} (linked to the evaluation runs it compared)")
    return 0


def _print_task(label: str):
    def report(task: str, r: dict, _out: dict) -> None:
        if r:
            print(f"{label} {task}: AUROC {r['auroc']:.3f} [{r['auroc_lo']:.3f}, {r['auroc_hi']:.3f}] "
                  f"AUPRC {r['auprc']:.3f} (n={r['n']}, positives {r['n_pos']})")
    return report


def _probe(args: argparse.Namespace) -> int:
    from stence.eval.report import RESULTS_KIND, claim_results, plot_auroc_vs_threshold, write_results
    from stence.outputs import check_output
    from stence.pipelines.downstream import close_evaluation, evaluate
    from stence.train.driver import absolute_storage

    cfg = config_from_args(args)
    encoder = args.encoder or cfg.downstream.encoder_checkpoint
    inputs = [p for p in (cfg.data.cohort, encoder) if p and Path(p).exists()]  # what --out must stay clear of
    if args.out:  # refuse a bad --out before any training
        check_output(args.out, RESULTS_KIND, inputs, args.overwrite)
    if encoder and not Path(encoder).exists():  # models:/NAME@ALIAS, runs:/...: fetch the registered scorer
        from stence.serving.fetch import fetch_scorer
        from stence.tracking.client import resolve_tracking_uri

        dst = Path(absolute_storage(cfg.train.storage_path)) / "fetched" / encoder.replace(":/", "_").replace("/", "_")
        encoder = str(fetch_scorer(encoder, dst, uri=resolve_tracking_uri(cfg)))
        inputs.append(encoder)
    label = args.label or (Path(encoder).parent.name if encoder else f"{cfg.model.ecg}-baseline")
    tasks = args.tasks or [cfg.downstream.task]
    results, evaluation = evaluate(cfg, label, args.mode, encoder, tasks, encoder_ref=args.encoder or encoder,
                                   report=_print_task(label))
    default = Path(absolute_storage(cfg.train.storage_path)) / "exports" / f"results-{label}"
    out_dir, overwrite = _results_out(args, default)
    j, m = write_results(results, claim_results(out_dir, inputs, overwrite))
    plot_auroc_vs_threshold(results, out_dir / "fig2_auroc_vs_threshold.png")
    close_evaluation(cfg, evaluation, results, out_dir)
    print(f"results: {j}\n{json.dumps(str(m))}")
    if evaluation:
        print(f"MLflow evaluation run {evaluation} (one nested run per task)")
    return 0

