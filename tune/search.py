"""The searcher and scheduler of a sweep, and what a trial asks of the cluster: Optuna (TPE or random) through
Ray Tune's OptunaSearch, a variant generator for fixed spaces, ASHA; start-up trials sized to the concurrency."""

from __future__ import annotations

from typing import Any

import optuna
import ray
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search.basic_variant import BasicVariantGenerator
from ray.tune.search.optuna import OptunaSearch

from stence.config import Config

DRIVER_RESOURCE = "driver"  # custom resource of non-preemptible nodes (cluster.yaml head node)


def driver_resources() -> dict[str, float]:
    """1 CPU for a trial driver, pinned to nodes offering the `driver` resource when the cluster has one,
    so that losing a (preemptible) worker node never kills a trial's driver."""
    res = {"CPU": 1.0}
    if ray.is_initialized() and ray.cluster_resources().get(DRIVER_RESOURCE, 0) > 0:
        res[DRIVER_RESOURCE] = 0.01
    return res


def default_concurrency(cfg: Config) -> int:
    """Trials that fit on the cluster at once: each takes 1 CPU for its driver plus its workers."""
    res = ray.cluster_resources()
    workers = max(1, cfg.train.workers)
    k = int(res.get("CPU", 0) // (1 + workers * cfg.train.cpus_per_worker))
    if cfg.train.gpus > 0:
        k = min(k, int(res.get("GPU", 0) // (workers * cfg.train.gpus)))
    return max(1, k)


SEARCHES = ("tpe", "random")


def startup_trials(num_samples: int, concurrency: int) -> int:
    """TPE's random start-up trials, sized to the concurrency.

    Optuna counts only finished trials towards `n_startup_trials`, so with `concurrency` trials running at
    once up to `concurrency - 1` more start at random before the start-up ends (ray-project/ray#52535). The
    sweep aims at min(10, num_samples // 2) random trials in all and asks Optuna for that many minus the
    concurrent surplus (at least 1)."""
    budget = min(10, max(1, num_samples // 2))
    return max(1, budget - (max(1, concurrency) - 1))


def make_searcher(
    fixed: bool,
    points: list[dict],
    metric: str,
    mode: str,
    seed: int,
    n_startup: int,
    max_concurrent: int,
    search: str = "tpe",
) -> Any:
    if fixed:
        # TuneConfig(max_concurrent_trials) is ignored (with a warning) for a variant generator
        return BasicVariantGenerator(
            points_to_evaluate=points, random_state=seed, max_concurrent=max_concurrent
        )
    # the same OptunaSearch either way: only the sampler differs, so a TPE/random comparison isolates it
    if search == "random":
        sampler: Any = optuna.samplers.RandomSampler(seed=seed)
    else:  # multivariate TPE; running trials count as "lies", so concurrent trials spread out
        sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=n_startup, multivariate=True,
                                             constant_liar=True)
    return OptunaSearch(metric=metric, mode=mode, sampler=sampler, points_to_evaluate=points or None)


def make_scheduler(name: str, metric: str, mode: str, max_t: int, reduction_factor: float) -> Any:
    if name == "none":
        return None
    # stop_last_trials=False: a trial reaching max_t ends by itself, so the trial function (not the
    # callback) closes its run and "stopped early" means stopped at a rung.
    return ASHAScheduler(
        time_attr="training_iteration",
        metric=metric,
        mode=mode,
        grace_period=1,
        max_t=max_t,
        reduction_factor=reduction_factor,
        stop_last_trials=False,
    )
