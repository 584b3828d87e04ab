"""A comparison of evaluations: one results table, Fig. 2, the paired tests of the first (reference) model
against each other on the same test rows, and its MLflow comparison run (`stence probe --compare`, the
ablation sweep's table)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from stence.config import Config
from stence.eval.compare import delong_table, paired_delong
from stence.eval.report import (
    RESULTS_KIND,
    claim_results,
    plot_auroc_vs_threshold,
    read_results,
    write_json,
    write_results,
)
from stence.outputs import check_output
from stence.tracking.evaluations import log_comparison

DEFAULT_COMPARE_OUT = "runs/results/compare"  # `stence probe --compare` without --out (the working directory's)
DEFAULT_HEADING = "Paired DeLong test and patient bootstrap on the same test rows"


@dataclass
class Comparison:
    """What a comparison wrote: its folder, results.md, the paired test rows and the comparison run."""

    out: Path
    md: Path
    delong: list[dict] = field(default_factory=list)
    run_id: str | None = None
    results: dict[str, dict] = field(default_factory=dict)


def compare(cfg: Config, results: dict[str, dict], out: Path, *, tasks: list[str] | None = None,
            heading: str = DEFAULT_HEADING, run_name: str = "", parent_run_id: str | None = None) -> dict:
    """Write results.json/.md, fig2_auroc_vs_threshold.png and delong.json into `out` (already claimed by the
    caller) and log them as one comparison run linked to the compared evaluation runs. The first model of
    `results` is the reference of the paired tests. Returns {"md", "delong", "run_id"}."""
    _, md = write_results(results, out)
    plot_auroc_vs_threshold(results, out / "fig2_auroc_vs_threshold.png", **({"tasks": tasks} if tasks else {}))
    scored = {k: v for k, v in results.items() if v}
    rows = paired_delong(scored) if len(scored) > 1 else []
    write_json(rows, out / "delong.json")
    if rows:
        md.write_text(md.read_text() + f"\n## {heading}\n\n" + delong_table(rows) + "\n")
    else:
        md.write_text(md.read_text() + "\n(no paired DeLong test: the results name no prediction files)\n")
    run_id = log_comparison(cfg, results, out, name=run_name, parent_run_id=parent_run_id)
    return {"md": md, "delong": rows, "run_id": run_id}


def compare_results(cfg: Config, results: dict[str, dict], out: str | Path, *, inputs: Iterable[str | Path] = (),
                    overwrite: bool = False, tasks: list[str] | None = None, heading: str = DEFAULT_HEADING,
                    run_name: str = "", parent_run_id: str | None = None) -> Comparison:
    """Claim `out` for results (new, empty, or an earlier results folder with `overwrite`; never one of
    `inputs`: OutputRefused) and write the comparison of `results` there (`compare`)."""
    folder = claim_results(out, inputs, overwrite)
    done = compare(cfg, results, folder, tasks=tasks, heading=heading, run_name=run_name,
                   parent_run_id=parent_run_id)
    return Comparison(folder, Path(done["md"]), done["delong"], done["run_id"], results)


def compare_files(cfg: Config, results_files: Sequence[str | Path], out: str | Path | None = None,
                  overwrite: bool = False) -> Comparison:
    """`stence probe --compare`: merge earlier results files (a later file's model replaces an earlier one of
    the same name) into one comparison in `out`. Without `out`, `DEFAULT_COMPARE_OUT`, the command's own
    folder, replaced on a re-run; an explicit `out` must be new or empty, or an earlier results folder with
    `overwrite`. The folder is checked before any file is read (OutputRefused)."""
    folder, overwrite = (Path(out), overwrite) if out else (Path(DEFAULT_COMPARE_OUT), True)
    check_output(folder, RESULTS_KIND, results_files, overwrite)  # before reading anything
    merged: dict[str, dict] = {}
    for f in results_files:
        merged.update(read_results(f))
    return compare_results(cfg, merged, folder, inputs=results_files, overwrite=overwrite)


__all__ = ["DEFAULT_COMPARE_OUT", "Comparison", "compare", "compare_files", "compare_results"]
