"""Stage B pipeline: StenCE pretraining on Ray Train. `stence pretrain` calls `run_pretrain` once; a sweep
calls the very same function per trial."""

from __future__ import annotations

from typing import Any

from stence.config import Config
from stence.pipelines.stage_runs import (
    best_state,
    export_pretrained,
    features_dir,
    finish,
    output_dir,
    training_run,
)
from stence.tracking.tags import ENCODER_PATH_TAG
from stence.train.driver import fit, tune_trial_id
from stence.train.pretrain_loop import SELECT_METRIC, pretrain_loop


def run_pretrain(cfg: Config, run_id: str | None = None) -> dict[str, Any]:
    """Stage B: StenCE pretraining; exports the checkpoint with the best smoothed kNN AUROC (stence.pt) and
    its ECG encoder (encoder.pt), both self-describing."""
    name = cfg.train.name
    run = training_run(cfg, run_id, "pretrain")
    ok = False
    try:
        feats = features_dir(cfg)
        result = fit(pretrain_loop, cfg, stage="pretrain", metric=SELECT_METRIC,
                     loop_config={"features_dir": feats, **run.loop_tracking()})
        state, best = best_state(result, SELECT_METRIC)
        out = output_dir(cfg, "pretrain", tune_trial_id() or name)  # one export per sweep trial
        paths = export_pretrained(cfg, state, out, {"metrics": best, "epoch": int(state["epoch"])},
                                  whole_model=True)
        if run.run_id:
            t = run.tracker()
            t.log_metrics({f"best/{k}": v for k, v in best.items() if isinstance(v, (int, float))}, step=0)
            t.set_tags({ENCODER_PATH_TAG: str(paths["encoder"])})
        ok = True
        return {"checkpoint": str(paths["checkpoint"]), "encoder": str(paths["encoder"]), "metrics": best,
                "run_id": run.run_id}
    finally:
        finish(run, ok)
