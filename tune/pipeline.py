"""The sweep pipeline `stence tune` calls: features once on the driver, the sweep (every trial runs
`stence.pipelines.pretrain.run_pretrain`), then, for a fixed-variant space, the ablation table, and the
registration of the best encoder."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from stence.config import Config
from stence.pipelines.pretrain import run_pretrain
from stence.train.features import extract_features
from stence.train.pretrain_loop import KNN_HI, KNN_LO, KNN_METRIC, SELECT_METRIC
from stence.tune.ablation import ablation_report
from stence.tune.budget import TrialEpochBudget
from stence.tune.champion import register_best
from stence.tune.spaces import SearchSpace
from stence.tune.sweep import run_sweep

logger = logging.getLogger(__name__)


@dataclass
class SweepOutcome:
    """What a sweep produced: Tune's result, the ablation report (fixed-variant spaces), the registration."""

    result: Any
    ablation: dict[str, Any] | None = None
    registration: dict[str, Any] | None = None


def sweep_pipeline(cfg: Config, space: SearchSpace, *, name: str, num_samples: int, max_concurrent: int | None,
                   scheduler: str, search: str, seed: int, resume: str | None, tasks: list[str],
                   register: bool, register_task: str | None, strict: bool,
                   budget: int | None = None) -> SweepOutcome:
    """Run the whole sweep; an interrupted sweep (`result.complete` False) stops before the report and the
    registration, to be resumed with `resume`.

    `budget` (trial-epochs, >= 1; a ValueError otherwise) ends the sweep once that many results were
    reported over all trials (`stence.tune.budget.TrialEpochBudget`): a sweep so ended is complete. The
    budget and what is spent of it are kept with the sweep: on `resume` the sweep goes on with its own, and a
    `budget` given then is ignored (with a warning)."""
    stop = None
    if budget is not None:
        if resume:
            logger.warning("--budget %d ignored on resume: the sweep keeps the budget it was started with", budget)
        else:
            stop = TrialEpochBudget(budget)  # refuses budget < 1 before the features or Ray start
    if not resume:
        extract_features(cfg)  # once, on the driver: trials then only open the cache
    result = run_sweep(run_pretrain, cfg, space=space, num_samples=num_samples, max_concurrent=max_concurrent,
                       scheduler=scheduler, metric=SELECT_METRIC, mode="max", resume=resume, seed=seed, name=name,
                       search=search, max_t=cfg.optim.epochs, stop=stop,
                       interval=(KNN_METRIC, KNN_LO, KNN_HI))
    outcome = SweepOutcome(result)
    if not result.complete:
        return outcome
    if space.fixed:  # the ablation: every variant's encoder probed -> table, Fig. 2, paired tests
        outcome.ablation = ablation_report(result, cfg, tasks)
    if register and cfg.tracking.enabled:
        outcome.registration = register_best(result, cfg, task=register_task, strict=strict, sweep_name=name)
    return outcome
