"""Paired comparison of models on the same test rows: DeLong's test per threshold task.

Each model's results entry for a task names its `predictions` file (the probe's test_predictions.npz:
y, p, index); two models are compared on the test rows both scored, which must carry the same labels.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

from stence.eval.metrics import delong_test


def _load(path: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    with np.load(path) as z:  # y, p: (N, 1); index: (N,) rows of the test split
        return z["index"].astype(np.int64), z["y"][:, 0].astype(np.float64), z["p"][:, 0].astype(np.float64)


def paired_delong(results: Mapping[str, Mapping[str, Mapping]], reference: str | None = None) -> list[dict]:
    """DeLong test of `reference` (default: the first model) against every other model, per task both
    have predictions for. Rows: task, model_a, model_b, auc_a, auc_b, diff, z, p_value, n, n_pos."""
    models = list(results)
    ref = reference or (models[0] if models else None)
    if ref is None or ref not in results:
        raise ValueError(f"reference model {reference!r} not in results ({models})")
    rows = []
    for other in (m for m in models if m != ref):
        for task, a in results[ref].items():
            b = results[other].get(task)
            if not isinstance(a, Mapping) or not isinstance(b, Mapping):
                continue
            pa, pb = a.get("predictions"), b.get("predictions")
            if not pa or not pb or not Path(pa).exists() or not Path(pb).exists():
                continue
            ia, ya, sa = _load(pa)
            ib, yb, sb = _load(pb)
            common, ka, kb = np.intersect1d(ia, ib, return_indices=True)
            if common.size == 0:
                raise ValueError(f"{ref} and {other} share no test rows on task {task}")
            if not np.array_equal(ya[ka], yb[kb]):
                raise ValueError(f"{ref} and {other} disagree on the labels of task {task}: not the same test set")
            d = delong_test(ya[ka], sa[ka], sb[kb])
            rows.append({"task": task, "model_a": ref, "model_b": other, "auc_a": d["auc1"], "auc_b": d["auc2"],
                         "diff": d["diff"], "z": d["z"], "p_value": d["p_value"], "n": d["n"], "n_pos": d["n_pos"]})
    return rows


def delong_table(rows: list[dict]) -> str:
    """Markdown table of `paired_delong` rows."""
    lines = ["| task | model A | model B | AUROC A | AUROC B | A - B | z | p (two-sided) | n | positives |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['task']} | {r['model_a']} | {r['model_b']} | {r['auc_a']:.3f} | {r['auc_b']:.3f} | "
                     f"{r['diff']:+.3f} | {r['z']:.2f} | {r['p_value']:.3g} | {r['n']} | {r['n_pos']} |")
    return "\n".join(lines)
