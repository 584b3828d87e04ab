"""Stage A on the demo cohort, judged on held-out data: the figures behind the README's stage-A paragraph.

Writes the demo cohort (split with the demo's salt, as `make demo` does) and a second synthetic cohort from
another seed, trains stage A with the demo's settings for each training seed, and scores every export on the
demo validation and test splits and on all studies of the second cohort. Prints and appends one JSON line per
seed (AUROC of patient, RCA, LCA, mean segment; mean patient probability by the study's maximum degree).

    python scripts/stage_a_heldout.py --out /tmp/stage_a --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np
import torch

from stence.config import Config, apply_overrides
from stence.data.cohort_io import Cohort
from stence.data.datasets import StudyDataset, collate_paired
from stence.data.ingest import ingest
from stence.data.synth import SynthConfig, write_cohort
from stence.eval.metrics import auroc
from stence.models.angio_e2e import AngioEndToEnd, load_stage_a_export
from stence.pipelines.angio import run_angio

MAJOR_SEGMENTS = (1, 2, 3, 5, 6, 7, 11, 13)
DEMO_SALT = "demo-site-secret-change-me"  # scripts/demo.sh's default: the salt decides the split
DEMO_STAGE_A = {"optim.epochs": 150, "optim.batch_size": 8, "optim.lr_angio": 1e-3}  # scripts/demo.sh step 3


def make_cohort(out: Path, **synth: object) -> Path:
    if not (out / "cohort").exists():
        write_cohort(out / "raw", SynthConfig.preset("demo", echonext=0, **synth))
        os.environ["STENCE_SALT"] = DEMO_SALT
        ingest(out / "raw", out / "cohort", Config(), processes=2)
    return out / "cohort"


def score(model: AngioEndToEnd, cohort: Path, splits: tuple[str, ...]) -> dict[str, object]:
    """AUROCs of the exported stage-A pair on the studies of `splits`, and mean patient probability by degree."""
    ys, ps, degs = [], [], []
    for split in splits:
        ds = StudyDataset(Cohort.open(cohort), split, Config().data, None, train=False)
        batch = collate_paired([ds[i] for i in range(len(ds))])
        with torch.no_grad():
            logits = model(batch["frames"], batch["view_mask"], batch["angles"])["stenosis_logits"]  # (N, 11)
        ys.append(batch["targets"].numpy())
        ps.append(torch.sigmoid(logits).numpy())
        degs.append(ds.rows[[f"seg{s}" for s in MAJOR_SEGMENTS]].to_numpy().max(axis=1))
    y, p, d = np.concatenate(ys), np.concatenate(ps), np.concatenate(degs)
    seg = [auroc(y[:, i], p[:, i]) for i in range(3, 11) if 0 < y[:, i].sum() < len(y)]
    return {"studies": len(y), "patient": round(auroc(y[:, 0], p[:, 0]), 3), "rca": round(auroc(y[:, 1], p[:, 1]), 3),
            "lca": round(auroc(y[:, 2], p[:, 2]), 3), "segment": round(float(np.mean(seg)), 3),
            "p_patient_by_degree": {int(k): round(float(p[d == k, 0].mean()), 3) for k in np.unique(d)}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="stage-A training seeds")
    ap.add_argument("--heldout-seed", type=int, default=7, help="synthetic seed of the held-out cohort")
    ap.add_argument("--heldout-patients", type=int, default=300)
    args = ap.parse_args()
    demo = make_cohort(args.out / "demo")
    held = make_cohort(args.out / "heldout", patients=args.heldout_patients, seed=args.heldout_seed)
    for seed in args.seeds:
        cfg = apply_overrides(Config(), {
            "data.cohort": str(demo), "train.storage_path": str(args.out / f"storage-{seed}"), "train.workers": 0,
            "train.name": f"stage-a-{seed}", "train.seed": seed, "tracking.enabled": False, "feature.variants": 1,
            **DEMO_STAGE_A})
        out = run_angio(cfg)
        model = load_stage_a_export(Path(out["checkpoint"]).parent, cfg.feature.frame_encoder)
        res = {"seed": seed, "exported_epoch": out["metrics"].get("epoch"),
               "val": score(model, demo, ("val",)), "test": score(model, demo, ("test",)),
               "heldout": score(model, held, ("train", "val", "test"))}
        print(json.dumps(res), flush=True)
        with open(args.out / "results.jsonl", "a") as f:
            f.write(json.dumps(res) + "\n")


if __name__ == "__main__":
    main()
