"""A comparison of evaluations: one results table, Fig. 2, the paired tests of the first (reference) model
against each other on the same test rows, and its MLflow comparison run (`stence probe --compare`, the
ablation sweep's table)."""

from __future__ import annotations

from pathlib import Path

from stence.config import Config
from stence.eval.compare import delong_table, paired_delong
from stence.eval.report import plot_auroc_vs_threshold, write_json, write_results
from stence.tracking.evaluations import log_comparison


def compare(cfg: Config, results: dict[str, dict], out: Path, *, tasks: list[str] | None = None,
            heading: str = "Paired DeLong test and patient bootstrap on the same test rows",
            run_name: str = "", parent_run_id: str | None = None) -> dict:
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
