"""Paired comparison of models on the same test rows, per threshold task: DeLong's test, and a paired
bootstrap of the AUROC difference that resamples patients.

Each model's results entry for a task names its `predictions` file (the probe's test_predictions.npz:
y, p, index, patients); two models are compared on the test rows both scored, which must carry the same
labels. DeLong treats rows as independent; several ECGs of one patient are not, so the patient bootstrap
is the one to trust when patients have several ECGs.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

from stence.eval.metrics import delong_test, paired_bootstrap_diff

N_BOOT = 2000


def _load(path: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    """index (N,) rows of the test split; y, p (N,); patients (N,) pseudonyms, or None when not saved.

    Never unpickles: predictions written before patients were stored as strings (an object array) load
    without patients, and the bootstrap then resamples rows, which the table says."""
    with np.load(path, allow_pickle=False) as z:  # y, p: (N, 1)
        idx = z["index"].astype(np.int64)
        try:
            patients = z["patients"] if "patients" in z.files else None
        except ValueError:  # an object array
            patients = None
        if patients is not None and patients.shape != idx.shape:
            patients = None
        return idx, z["y"][:, 0].astype(np.float64), z["p"][:, 0].astype(np.float64), patients


def paired_delong(results: Mapping[str, Mapping[str, Mapping]], reference: str | None = None) -> list[dict]:
    """DeLong test and patient-bootstrap test of `reference` (default: the first model) against every other
    model, per task both have predictions for. Rows: task, model_a, model_b, auc_a, auc_b, diff, z, p_value,
    n, n_pos (DeLong), and boot_diff_lo, boot_diff_hi, boot_p_value, boot_units ("patients", or "rows"
    when the predictions carry no patients), n_units, n_boot_valid."""
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
            ia, ya, sa, patients = _load(pa)
            ib, yb, sb, _ = _load(pb)
            common, ka, kb = np.intersect1d(ia, ib, return_indices=True)
            if common.size == 0:
                raise ValueError(f"{ref} and {other} share no test rows on task {task}")
            if not np.array_equal(ya[ka], yb[kb]):
                raise ValueError(f"{ref} and {other} disagree on the labels of task {task}: not the same test set")
            d = delong_test(ya[ka], sa[ka], sb[kb])
            groups = patients[ka] if patients is not None else None
            bs = paired_bootstrap_diff(ya[ka], sa[ka], sb[kb], groups=groups, n_boot=N_BOOT)
            rows.append({"task": task, "model_a": ref, "model_b": other, "auc_a": d["auc1"], "auc_b": d["auc2"],
                         "diff": d["diff"], "z": d["z"], "p_value": d["p_value"], "n": d["n"], "n_pos": d["n_pos"],
                         "boot_diff_lo": bs["diff_lo"], "boot_diff_hi": bs["diff_hi"], "boot_p_value": bs["p_value"],
                         "boot_units": "patients" if groups is not None else "rows", "n_units": bs["n_units"],
                         "n_boot_valid": bs["n_boot_valid"]})
    return rows


def _boot_p(r: dict) -> str:
    p, n = r.get("boot_p_value", float("nan")), r.get("n_boot_valid", 0)
    return f"< {1 / n:.2g}" if p == 0 and n else f"{p:.3g}"


def delong_table(rows: list[dict]) -> str:
    """Markdown table of `paired_delong` rows: DeLong (rows independent) beside the paired bootstrap."""
    lines = ["| task | model A | model B | AUROC A | AUROC B | A - B | DeLong z | DeLong p | "
             "A - B 95 % CI (bootstrap) | bootstrap p | n | positives | units resampled |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        units = f"{r.get('n_units', '')} {r.get('boot_units', '')}".strip()
        lines.append(f"| {r['task']} | {r['model_a']} | {r['model_b']} | {r['auc_a']:.3f} | {r['auc_b']:.3f} | "
                     f"{r['diff']:+.3f} | {r['z']:.2f} | {r['p_value']:.3g} | "
                     f"[{r.get('boot_diff_lo', float('nan')):+.3f}, {r.get('boot_diff_hi', float('nan')):+.3f}] | "
                     f"{_boot_p(r)} | {r['n']} | {r['n_pos']} | {units} |")
    return "\n".join(lines)
