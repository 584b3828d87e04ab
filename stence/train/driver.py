"""The driver: build a Ray Train V2 `TorchTrainer` for a per-worker loop and fit it.

A single training run is `fit(...)` called once; a sweep hands a function that calls `fit(...)` to
Ray Tune (tune/sweep.py). Inside a Tune trial `fit` adds `TuneReportCallback` (without it Tune, Optuna
and ASHA see no metrics) and names the run after the trial id, so a restored trial resumes its Train
run from the latest checkpoint: the same (storage_path, name) resumes, hence no timestamps in names.
"""

from __future__ import annotations

import logging
import math
import os
import socket
from collections.abc import Callable
from typing import Any

from stence.config import Config, ConfigError, to_dict
from stence.tracking.client import project_dir
from stence.train.local_mode import select_local_best

logger = logging.getLogger(__name__)

START_TIMEOUT_ENV = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"
DEFAULT_START_TIMEOUT_S = "120"  # a worker group on a busy 2-core machine can take 30 s to start
# A worker group that cannot be scheduled is a controller failure; the default (-1) retries forever.
CONTROLLER_FAILURE_LIMIT = 2
_OWN_ADDRESS: str | None = None  # address of the local instance ensure_ray started (set at call time)


def own_ray_address() -> str | None:
    """The address of the local Ray instance `ensure_ray` started in this process (it exports it as
    RAY_ADDRESS for Ray's State API); None when it started none."""
    return _OWN_ADDRESS


def ensure_ray(num_cpus: int | None = None, address: str | None = None) -> None:
    """Initialise Ray once per process.

    With `address` or $RAY_ADDRESS set, connect to that cluster. Otherwise start a local instance
    with max(4, num_cpus or os.cpu_count()) logical CPUs, so that two 1-CPU workers plus a Tune
    trial driver fit on a 2-core machine. The dashboard stays on: without it the placement group of
    a trial stopped early by ASHA is never freed and the next trial waits forever.
    """
    import ray  # ray (~0.5 s to import): light commands import this module for its helpers

    global _OWN_ADDRESS
    if ray.is_initialized():
        return
    env_address = os.environ.get("RAY_ADDRESS") or None
    if env_address and env_address == _OWN_ADDRESS:  # left over from our own, now shut down, instance
        env_address = None
    address = address or env_address
    if address:
        ray.init(address=address)
        return
    # Ray's State API (used by Train's placement-group cleaner, i.e. by every early-stopped trial)
    # finds "its" cluster by scanning processes when RAY_ADDRESS is unset, and fails when another Ray
    # instance runs on the same machine (parallel CI jobs, several users). Fix the GCS port and export
    # the address before starting, so the raylet and every worker inherit it.
    port = _free_port()
    _OWN_ADDRESS = f"{ray.util.get_node_ip_address()}:{port}"
    os.environ["RAY_GCS_SERVER_PORT"] = str(port)
    os.environ["RAY_ADDRESS"] = _OWN_ADDRESS
    try:
        ray.init(address="local", num_cpus=max(4, num_cpus or os.cpu_count() or 1), include_dashboard=True)
    finally:
        os.environ.pop("RAY_GCS_SERVER_PORT", None)


def shutdown_ray() -> None:
    """ray.shutdown(), forgetting the address ensure_ray exported for its own local instance."""
    import ray  # ray (~0.5 s to import): light commands import this module for its helpers

    global _OWN_ADDRESS
    ray.shutdown()
    if _OWN_ADDRESS and os.environ.get("RAY_ADDRESS") == _OWN_ADDRESS:
        os.environ.pop("RAY_ADDRESS")
    _OWN_ADDRESS = None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return int(s.getsockname()[1])


def tune_trial_id() -> str | None:
    """The id of the Tune trial this process runs, or None outside Ray Tune."""
    # ray.tune (~1 s to import): light commands import this module for its helpers
    from ray.tune.trainable.trainable_fn_utils import _in_tune_session

    if not _in_tune_session():
        return None
    import ray.tune  # ray.tune (~1 s to import): only inside a trial

    return ray.tune.get_context().get_trial_id()


def absolute_storage(path: str) -> str:
    """Absolute storage path (URIs such as s3:// pass through); relative paths mean the project
    directory, which inside a Tune trial is the original working directory, not the trial's."""
    if "://" in path:
        return path
    return str((project_dir() / path).resolve())


def run_name_for(cfg: Config, stage: str, run_name: str | None = None) -> str:
    """`<stage>-<trial id>` inside a Tune trial, else `run_name` or `<train.name>-<stage>`."""
    trial_id = tune_trial_id()
    if trial_id is not None:
        return f"{stage}-{trial_id}"
    return run_name or f"{cfg.train.name}-{stage}"


def parse_worker_resources(entries: tuple[str, ...] | list[str]) -> dict[str, float]:
    """train.worker_resources ("NAME=AMOUNT" strings) as {name: amount}; ConfigError on a bad entry."""
    out: dict[str, float] = {}
    for entry in entries:
        name, sep, amount = str(entry).partition("=")
        name = name.strip()
        if not sep or not name:
            raise ConfigError(f"train.worker_resources: {entry!r} is not of the form NAME=AMOUNT (e.g. spot=1)")
        if name.upper() in ("CPU", "GPU"):
            key = "cpus_per_worker" if name.upper() == "CPU" else "gpus"
            raise ConfigError(f"train.worker_resources: {entry!r}: set {name.upper()} with train.{key}")
        try:
            value = float(amount)
        except ValueError:
            value = math.nan
        if not (math.isfinite(value) and value > 0):
            raise ConfigError(f"train.worker_resources: {entry!r}: the amount must be a number > 0")
        if name in out:
            raise ConfigError(f"train.worker_resources: {name!r} is given twice")
        out[name] = value
    return out


def _warn_unoffered(resources: dict[str, float]) -> None:
    """Warn about custom resources no node of the connected cluster offers (yet: an autoscaler may add one)."""
    import ray  # ray (~0.5 s to import): light commands import this module for its helpers

    if not ray.is_initialized():
        return
    offered = ray.cluster_resources()
    missing = sorted(k for k, v in resources.items() if offered.get(k, 0) < v)
    if missing:
        logger.warning("train.worker_resources: no node offers enough of %s; the workers wait for such a node",
                       missing)


def build_trainer(
    loop_fn: Callable[[dict], Any],
    cfg: Config,
    *,
    stage: str,
    loop_config: dict[str, Any] | None = None,
    metric: str,
    mode: str = "max",
    run_name: str | None = None,
) -> Any:
    """A TorchTrainer for `loop_fn` wired from cfg.train (see `fit`)."""
    # ray.train.torch (~3 s to import): only when a run starts; light commands import this module
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    if mode not in ("max", "min"):
        raise ValueError(f"mode must be 'max' or 'min', got {mode!r}")
    in_tune = tune_trial_id() is not None
    workers = cfg.train.workers
    if in_tune and workers == 0:
        # ray.train.report() raises inside a Tune session in local mode: a trial needs a worker.
        logger.warning("train.workers=0 (local mode) is not possible inside a Tune trial; using 1 worker")
        workers = 1
    custom = parse_worker_resources(cfg.train.worker_resources)  # pins workers to nodes offering them
    resources: dict[str, float] = {"CPU": float(cfg.train.cpus_per_worker)}  # upper-case keys
    if cfg.train.gpus > 0:
        resources["GPU"] = float(cfg.train.gpus)
    if custom and workers:
        _warn_unoffered(custom)
        resources.update(custom)
    scaling = ScalingConfig(
        num_workers=workers, use_gpu=cfg.train.gpus > 0, resources_per_worker=resources if workers else None
    )
    callbacks = []
    if in_tune:
        from ray.tune.integration.ray_train import TuneReportCallback  # ray.tune: only inside a trial

        callbacks.append(TuneReportCallback())
    run_config = RunConfig(
        name=run_name_for(cfg, stage, run_name),
        storage_path=absolute_storage(cfg.train.storage_path),
        checkpoint_config=CheckpointConfig(
            num_to_keep=cfg.train.keep_checkpoints if cfg.train.keep_checkpoints > 0 else None,
            checkpoint_score_attribute=metric,
            checkpoint_score_order=mode,
        ),
        failure_config=FailureConfig(
            max_failures=cfg.train.max_failures, controller_failure_limit=CONTROLLER_FAILURE_LIMIT
        ),
        callbacks=callbacks,
    )
    return TorchTrainer(
        loop_fn,
        train_loop_config={"config": to_dict(cfg), **(loop_config or {})},
        scaling_config=scaling,
        run_config=run_config,
    )


def fit(
    loop_fn: Callable[[dict], Any],
    cfg: Config,
    *,
    stage: str,
    loop_config: dict[str, Any] | None = None,
    metric: str,
    mode: str = "max",
    run_name: str | None = None,
) -> Any:
    """Run `loop_fn(config)` on cfg.train.workers Ray Train workers and return the `ray.train.Result`.

    `config` is {"config": resolved config dict, **loop_config}. Checkpoints are scored by `metric`
    (`mode`) and cfg.train.keep_checkpoints are kept; cfg.train.max_failures worker-group restarts
    resume from the latest checkpoint; workers=0 runs the loop in this process (local mode). Each worker
    asks for cfg.train.cpus_per_worker CPUs, cfg.train.gpus GPUs and the custom resources of
    cfg.train.worker_resources (which pin it to the nodes offering them). gloo is
    used on CPU and nccl on GPU (Ray chooses from use_gpu). A run that cannot get its resources fails
    after CONTROLLER_FAILURE_LIMIT retries of $RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S instead of
    waiting forever.
    """
    os.environ.setdefault(START_TIMEOUT_ENV, DEFAULT_START_TIMEOUT_S)  # propagated to the controller
    if cfg.train.workers > 0 or tune_trial_id() is not None:
        ensure_ray()
    else:
        select_local_best(metric, mode)
    trainer = build_trainer(
        loop_fn, cfg, stage=stage, loop_config=loop_config, metric=metric, mode=mode, run_name=run_name
    )
    return trainer.fit()


__all__ = [
    "CONTROLLER_FAILURE_LIMIT",
    "absolute_storage",
    "build_trainer",
    "ensure_ray",
    "fit",
    "parse_worker_resources",
    "run_name_for",
    "shutdown_ray",
    "tune_trial_id",
]
