"""`stence probe` / `stence finetune`: stage C on threshold tasks (or EchoNext), with 95 % bootstrap CIs."""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

from stence.commands._common import RAW, add_config_args, add_run_args, config_from_args

EXAMPLE = """example:
  stence {cmd} --encoder runs/ray/exports/pretrain-stence/encoder.pt --tasks 0_100 0_90 lt70_ge70 le50_ge99
  stence {cmd} --tasks 0_100 --label baseline                      # random-init baseline
  stence {cmd} --compare results/a.json results/b.json --out results/   # Fig. 2 + table of several models"""


def _add(sub: argparse._SubParsersAction, cmd: str) -> None:
    p = sub.add_parser(cmd, help=f"stage C: {'linear probe' if cmd == 'probe' else 'fine-tune'} an ECG encoder",
                       description=__doc__, epilog=EXAMPLE.format(cmd=cmd), formatter_class=RAW)
    p.add_argument("--encoder", default="", help="encoder.pt, stence.pt, scorer.pt or a registered model "
                   "(models:/stence-ecg-encoder@champion); default: the configured baseline")
    p.add_argument("--tasks", nargs="+", default=None, help="threshold tasks (default: downstream.task)")
    p.add_argument("--label", default=None, help="model name in tables and plots")
    p.add_argument("--out", default=None, help="folder for results.json/.md and the Fig. 2 plot")
    p.add_argument("--compare", nargs="+", default=None, metavar="RESULTS_JSON",
                   help="only merge earlier results files into one table and Fig. 2")
    add_config_args(p)
    add_run_args(p)
    p.set_defaults(func=run, mode=cmd.replace("finetune", "finetune"))


def add_parser(sub: argparse._SubParsersAction) -> None:
    _add(sub, "probe")
    _add(sub, "finetune")


def run(args: argparse.Namespace) -> int:
    from stence.eval.report import plot_auroc_vs_threshold, read_results, write_results

    if args.compare:
        merged: dict = {}
        for f in args.compare:
            merged.update(read_results(f))
        out = Path(args.out or "runs/results")
        j, m = write_results(merged, out)
        plot_auroc_vs_threshold(merged, out / "fig2_auroc_vs_threshold.png")
        _write_delong(merged, out, Path(m))
        print(Path(m).read_text())
        return 0
    from stence.train.stages import run_downstream

    cfg = config_from_args(args)
    encoder = args.encoder or cfg.downstream.encoder_checkpoint
    if encoder and not Path(encoder).exists():  # models:/NAME@ALIAS, runs:/...: fetch the registered scorer
        from stence.serving.fetch import fetch_scorer
        from stence.train.driver import absolute_storage
        from stence.train.tracking import resolve_tracking_uri

        dst = Path(absolute_storage(cfg.train.storage_path)) / "fetched" / encoder.replace(":/", "_").replace("/", "_")
        encoder = str(fetch_scorer(encoder, dst, uri=resolve_tracking_uri(cfg)))
    d = replace(cfg.downstream, mode=args.mode, encoder_checkpoint=encoder)
    label = args.label or (Path(encoder).parent.name if encoder else f"{cfg.model.ecg}-baseline")
    results: dict = {label: {}}
    for task in args.tasks or [d.task]:
        out = run_downstream(replace(cfg, downstream=replace(d, task=task)), label=label)
        results[label].update({k: v for k, v in out["metrics"].items() if k not in ("subgroups", "val")})
        if task in results[label]:  # for paired tests later (`--compare`)
            results[label][task]["predictions"] = str(Path(out["out"]).resolve() / "test_predictions.npz")
        r = out["metrics"].get(task, {})
        if r:
            print(f"{label} {task}: AUROC {r['auroc']:.3f} [{r['auroc_lo']:.3f}, {r['auroc_hi']:.3f}] "
                  f"AUPRC {r['auprc']:.3f} (n={r['n']}, positives {r['n_pos']})")
    out_dir = Path(args.out or Path(out["out"]).parent / f"results-{label}")
    j, m = write_results(results, out_dir)
    plot_auroc_vs_threshold(results, out_dir / "fig2_auroc_vs_threshold.png")
    print(f"results: {j}\n{json.dumps(str(m))}")
    return 0


def _write_delong(results: dict, out: Path, md: Path) -> None:
    """Paired tests (first model vs each other: DeLong, patient bootstrap) into delong.json and the Markdown
    table."""
    from stence.eval.compare import delong_table, paired_delong
    from stence.eval.report import write_json

    rows = paired_delong(results)
    write_json(rows, out / "delong.json")
    if rows:
        md.write_text(md.read_text() + "\n## Paired DeLong test and patient bootstrap on the same test rows\n\n" + delong_table(rows) + "\n")
    else:
        md.write_text(md.read_text() + "\n(no paired DeLong test: the results name no prediction files)\n")
