"""A sweep driver of its own process for the crash tests (tests/test_sweep_crash.py): the toy trial (real Ray
Train, 1 worker, real MLflow child runs) in a seeded TPE + ASHA sweep, one trial at a time.

`--kill-at K:E:FILE` SIGKILLs this very process while Tune hands trial K (0-based, in start order) its epoch-E
result to the callbacks, once: FILE arms it and is removed first (the callback comes back with a resume).
Trials run in lockstep with the driver (`Ack`), so after the kill no trial trains on unseen: that result is then in no experiment snapshot, the scheduler never decided on it,
and the trial's checkpoint of epoch E exists. `--resume PATH` continues the sweep. The outcome is printed
as one JSON line.

Usage: python -m tests.crash_sweep_driver --root DIR --uri URI [--kill-at 1:2:ARM_FILE] [--resume PATH]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import signal
from typing import Any

from ray import tune

from stence.config import load_config
from stence.train.worker import RESTORED_KEY
from stence.tune import spaces
from stence.tune.sweep import run_sweep
from tests.toy_loop import METRIC, TOY_PARAMS, toy_train_fn

SPACE = "toy-crash"
# Each trial costs a Train run's start and stop; 4 trials of 3 epochs still hold what the test needs: two good
# points before the kill (trial 1 killed at its epoch 2, a rung, with an epoch left to train), the bad point first
# after the resume, and a trial that the restored Optuna study proposes itself. ASHA's rungs: epochs 1 and 2.
EPOCHS = 3
NUM_SAMPLES = 4
CRASH_SPACE = {
    "kind": "search",
    "params": TOY_PARAMS,
    # two good points, then a bad one: ASHA (reduction factor 2) stops it at the first rung, after the kill,
    # only if the rung records of the first two came back with the resume
    "points_to_evaluate": [
        {"loss.w_sten": 0.3, "optim.lr_ecg": 3e-2},
        {"loss.w_sten": 0.1, "optim.lr_ecg": 5e-2},
        {"loss.w_sten": 1.0, "optim.lr_ecg": 1e-3},
    ],
}
SWEEP_KWARGS: dict[str, Any] = dict(space=SPACE, num_samples=NUM_SAMPLES, max_concurrent=1, scheduler="asha",
                                    metric=METRIC, mode="max", seed=0, reduction_factor=2, max_t=EPOCHS,
                                    n_startup_trials=1)  # fmt: skip


class KillAt(tune.Callback):
    """SIGKILLs the sweep driver (this process) at trial `k`'s epoch `e` (not a restored repeat) while `arm`
    exists, removing it first."""

    def __init__(self, k: int, e: int, arm: str):
        self.k, self.e, self.arm = k, e, arm
        self.order: list[str] = []

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        if trial.trial_id not in self.order:
            self.order.append(trial.trial_id)
        if (self.order.index(trial.trial_id) == self.k and result.get("training_iteration") == self.e
                and not result.get(RESTORED_KEY) and os.path.exists(self.arm)):
            os.remove(self.arm)
            os.kill(os.getpid(), signal.SIGKILL)


class Ack(tune.Callback):
    """Lets a trial go on past an epoch once this driver has taken its result and not stopped the trial
    (tests/toy_loop.py waits for the file): a trial never runs ahead of the sweep driver, so neither a
    trial ASHA stopped nor one whose driver died trains (and logs) another epoch meanwhile."""

    def __init__(self, ack_dir: str):
        self.ack_dir = ack_dir

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        if not result.get("done"):  # done: the scheduler stopped it (decided before the callbacks run)
            open(os.path.join(self.ack_dir, f"{trial.trial_id}-{result['training_iteration']}"), "w").close()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--root", required=True)
    p.add_argument("--uri", required=True)
    p.add_argument("--kill-at", default=None)
    p.add_argument("--resume", default=None)
    args = p.parse_args(argv)
    spaces.SPACES[SPACE] = CRASH_SPACE
    cfg = load_config(None, [f"train.storage_path={args.root}/ray", "train.workers=1", f"optim.epochs={EPOCHS}",
                             "optim.batch_size=32", f"tracking.uri={args.uri}", "tracking.experiment=crash",
                             "train.keep_checkpoints=1"])  # fmt: skip
    ack_dir = os.path.join(args.root, "acks")
    os.makedirs(ack_dir, exist_ok=True)
    callbacks: list[Any] = []
    if args.kill_at:
        k, e, arm = args.kill_at.split(":", 2)
        callbacks.append(KillAt(int(k), int(e), arm))  # before Ack: the killed epoch is never acknowledged
    callbacks.append(Ack(ack_dir))
    train_fn = functools.partial(toy_train_fn, log_dir=None, ack_dir=ack_dir)
    result = run_sweep(train_fn, cfg, resume=args.resume, name="crash", callbacks=callbacks, **SWEEP_KWARGS)
    print(json.dumps({"path": str(result.path), "complete": result.complete,
                      "trials": sorted(result.results["trial_id"])}))  # fmt: skip


if __name__ == "__main__":
    main()
