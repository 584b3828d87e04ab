"""Reporting: Markdown tables name every model and task, JSON round-trips, figures are real PNGs."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
from matplotlib.image import imread

from stence.config import THRESHOLD_TASKS
from stence.eval.metrics import bootstrap_ci
from stence.eval.report import (
    TASK_LABELS,
    format_cell,
    plot_auroc_vs_threshold,
    plot_roc,
    read_results,
    threshold_table,
    write_results,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _scores(n: int, effect: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    return y, rng.normal(size=n) + effect * y


@pytest.fixture(scope="module")
def results() -> dict:
    """Two models x four tasks of real bootstrap output, plus a model missing a task and one undefined cell."""
    out: dict = {}
    for m, (model, base) in enumerate({"EchoingECG-StenCE": 1.2, "OTIS-StenCE": 0.6}.items()):
        out[model] = {
            task: bootstrap_ci(*_scores(300, base - 0.2 * i, 10 * m + i), n_boot=200)
            for i, task in enumerate(THRESHOLD_TASKS)
        }
    partial = {t: out["OTIS-StenCE"][t] for t in ("0_100", "lt70_ge70")}
    with pytest.warns(RuntimeWarning):
        partial["0_90"] = bootstrap_ci(np.zeros(20), np.arange(20.0), n_boot=10)  # one class: NaN
    out["EchoingECG|no-pretrain"] = partial  # a '|' in a name must not break the table
    return out


def _cells(line: str) -> list[str]:
    return [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]


def test_task_labels_cover_config_tasks() -> None:
    assert set(TASK_LABELS) == set(THRESHOLD_TASKS)
    assert TASK_LABELS["le50_ge99"] == "(≤50|≥99)"


def test_format_cell() -> None:
    d = {"auroc": 0.8123, "auroc_lo": 0.7712, "auroc_hi": 0.8499}
    assert format_cell(d) == "0.812 [0.77, 0.85]"
    assert format_cell({"auroc": float("nan")}) == "n/a"
    assert format_cell(None) == "—"


def test_threshold_table_has_every_model_and_task(results: dict) -> None:
    table = threshold_table(results)
    lines = table.splitlines()
    assert len(lines) == 2 + len(results)
    header = _cells(lines[0])
    assert header[1:] == [TASK_LABELS[t].replace("|", "\\|") for t in THRESHOLD_TASKS]
    for line in lines[2:]:
        assert len(_cells(line)) == len(header)  # escaped '|' keeps columns aligned
    for model, per_task in results.items():
        row = next(line for line in lines if _cells(line)[0] == model.replace("|", "\\|"))
        for d in per_task.values():
            assert format_cell(d) in _cells(row)
    assert f"{results['OTIS-StenCE']['0_100']['auroc']:.3f}" in table
    partial_row = _cells(lines[-1])
    assert "n/a" in partial_row and "—" in partial_row


def test_write_results_round_trips_as_strict_json(results: dict, tmp_path: Path) -> None:
    json_path, md_path = write_results(results, tmp_path / "out", stem="test")
    assert json_path.name == "test.json" and md_path.name == "test.md"

    def forbid(token: str):
        raise AssertionError(f"non-standard JSON token {token}")

    json.loads(json_path.read_text(), parse_constant=forbid)  # NaN written as null
    back = read_results(json_path)
    assert back.keys() == results.keys()
    for model, per_task in results.items():
        assert back[model].keys() == per_task.keys()
        for task, d in per_task.items():
            for key, v in d.items():
                w = back[model][task][key]
                if isinstance(v, float) and math.isnan(v):
                    assert math.isnan(w)
                else:
                    assert w == v
    md = md_path.read_text()
    for model in results:
        assert model.replace("|", "\\|") in md
    assert "AUPRC" in md and "AUROC" in md


def _assert_png(path: Path, min_bytes: int = 10_000) -> np.ndarray:
    assert path.is_file()
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and len(data) > min_bytes
    img = imread(path)
    assert img.ndim == 3 and img.shape[0] > 200 and img.shape[1] > 200
    assert img[..., :3].std() > 0.01  # something was drawn
    return img


def test_fig2_png(results: dict, tmp_path: Path) -> None:
    path = plot_auroc_vs_threshold(results, tmp_path / "figs" / "fig2.png")
    _assert_png(path)


def test_roc_png(tmp_path: Path) -> None:
    curves = {
        "good": _scores(400, 1.5, 0),
        "weak": _scores(400, 0.3, 1),
        "empty": (np.zeros(10), np.ones(10)),
    }
    _assert_png(plot_roc(curves, tmp_path / "roc.png"))
