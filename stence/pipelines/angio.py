"""Stage A pipeline: train the angiography stenosis model on Ray Train and export it."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from stence.config import Config, to_dict
from stence.models.angio_e2e import build_angio_end_to_end, save_frame_encoder, trains_frame_encoder
from stence.models.checkpoint import save_aggregator
from stence.models.registry import build_aggregator
from stence.pipelines.stage_runs import best_state, features_dir, finish, output_dir, training_run
from stence.train.angio_loop import ANGIO_METRIC, angio_loop
from stence.train.driver import fit


def run_angio(cfg: Config, run_id: str | None = None) -> dict[str, Any]:
    """Stage A: train the aggregator on the 11 stenosis targets; export the best as aggregator.pt.

    Trained end to end (`stage_a.train_frame_encoder`, by default whenever no `feature.frame_checkpoint` is
    given), the frame encoder learns with it from the cached key frames and is exported too, as
    frame_encoder.pt; stage B then caches its features with `feature.frame_checkpoint=<frame_encoder.pt>`.
    """
    name = cfg.train.name
    run = training_run(cfg, run_id, "angio")
    ok = False
    try:
        end_to_end = trains_frame_encoder(cfg)
        inputs = {"end_to_end": True} if end_to_end else {"features_dir": features_dir(cfg)}
        result = fit(angio_loop, cfg, stage="angio", metric=ANGIO_METRIC,
                     loop_config={**inputs, **run.loop_tracking()})
        state, best = best_state(result, ANGIO_METRIC)
        out = output_dir(cfg, "angio", name)
        fresh = replace(cfg, model=replace(cfg.model, angio_checkpoint=""))
        paths = {"checkpoint": out / "aggregator.pt"}
        extra = {"metrics": best, "epoch": int(state["epoch"])}
        if end_to_end:
            model = build_angio_end_to_end(fresh)
            model.load_state_dict(state["model"])
            agg = model.aggregator
            paths["frame_encoder"] = save_frame_encoder(out / "frame_encoder.pt", model.frame_encoder.eval(),
                                                        to_dict(cfg), extra=extra)
        else:
            agg = build_aggregator(fresh)
            agg.load_state_dict(state["model"])
        save_aggregator(paths["checkpoint"], agg, to_dict(cfg), extra=extra)
        if run.run_id:
            t = run.tracker()
            for path in paths.values():
                t.log_artifact(path)
        ok = True
        return {**{k: str(v) for k, v in paths.items()}, "metrics": best, "run_id": run.run_id}
    finally:
        finish(run, ok)
