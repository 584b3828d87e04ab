"""Every MLflow tag key the platform writes or reads, defined once.

Run tags unless said otherwise; the `stence.*` keys are what users filter on in the MLflow UI
(tags.`stence.stage` = 'evaluation'), so a key never changes once released.
"""

from __future__ import annotations

# MLflow's own keys
PARENT_TAG = "mlflow.parentRunId"  # nesting: the UI draws a run under its parent
RUN_NAME_TAG = "mlflow.runName"  # the run's display name
DATASET_CONTEXT_TAG = "mlflow.data.context"  # input tag of a dataset input (mlflow.utils.mlflow_tags)

# every run
CONFIG_HASH_TAG = "stence.config_hash"  # hash of the resolved config (also a model-version tag)
DRIVER_TAG = "stence.driver"  # "host|pid|boot id|start ticks" of the process that drives the run
SPOOL_TAG = "stence.spool"  # the spool file the run's trackers buffer to (replayed by `stence runs repair`)
HEARTBEAT_TAG = "stence.heartbeat"  # unix seconds of the latest metrics: `stence runs repair --older-than`
REPAIRED_TAG = "stence.repaired"  # why `stence runs repair` ended the run
STAGE_TAG = "stence.stage"  # pretrain, angio, downstream stages, evaluation, comparison, register

# stage runs
ENCODER_PATH_TAG = "stence.encoder_path"  # the exported encoder file of a pretraining run
SCORER_PATH_TAG = "stence.scorer_path"  # the scorer file a `stence register` run was created for

# evaluation and comparison runs
LABEL_TAG = "stence.label"  # the model label of an evaluation
MODE_TAG = "stence.mode"  # probe or finetune
ENCODER_TAG = "stence.encoder"  # the evaluated encoder, without a local path
COHORT_TAG = "stence.cohort"  # fingerprint of the cohort an evaluation scored
COMPARED_TAG = "stence.compared_runs"  # JSON list of the evaluation run ids a comparison compared
COMPARED_PREFIX = "stence.compared."  # + model label: one tag per compared evaluation run (its id)

# sweeps: the parent run and its trial runs
SWEEP_TAG = "stence.sweep"  # the sweep name, on the parent, its trials and the versions they registered
SWEEP_PATH_TAG = "stence.sweep_path"  # on the parent: the Tune experiment folder (for repair)
KIND_TAG = "stence.kind"  # "sweep" on a sweep's parent run
SPACE_TAG = "stence.space"  # the search space's name
RESUMED_AT_TAG = "stence.resumed_at"  # local time a resumed sweep reopened its parent run
INTERRUPTED_TAG = "stence.interrupted"  # "true" when the sweep stopped before its budget was spent
FAILED_TRIALS_TAG = "stence.failed_trials"  # how many trials errored
BEST_TRIAL_TAG = "stence.best_trial_id"  # the winning trial
BEST_OVERRIDES_TAG = "stence.best_overrides"  # JSON of the winning trial's sampled overrides
BEST_CHECKPOINT_TAG = "stence.best_checkpoint"  # the winning trial's best checkpoint
TRIAL_TAG = "stence.trial_id"  # a trial's Tune id (also on the version its sweep registered)
OVERRIDES_TAG = "stence.overrides"  # JSON of a trial's sampled overrides
STOPPED_TAG = "stence.stopped_early"  # "true" on a trial ASHA stopped

# model versions (and logged models): provenance a champion is compared on
TASK_TAG = "stence.task"  # the scorer's task
METRIC_TAG = "stence.metric"  # e.g. "0_100/auroc": task and metric, compared as one name
METRIC_VALUE_TAG = "stence.metric_value"  # the metric's value (repr of a float)
METRIC_LO_TAG = "stence.metric_lo"  # its bootstrap lower bound
METRIC_HI_TAG = "stence.metric_hi"  # its bootstrap upper bound
METRIC_INTERVAL_TAG = "stence.metric_interval"  # human-readable "0.812 [0.770, 0.851]"
COHORT_FINGERPRINT_TAG = "stence.cohort_fingerprint"  # the cohort the metric was measured on
CODE_COMMIT_TAG = "stence.code_commit"  # `git rev-parse HEAD` of the source tree
SEED_TAG = "stence.seed"  # train.seed of the scorer's config
INPUT_CONTRACT_TAG = "stence.input_contract"  # JSON input spec {fs, n_samples, leads, lead_order, contract}
PROMOTION_TAG = "stence.promotion"  # why the alias moved or did not
BEST_KNN_AUROC_TAG = "stence.best_knn_auroc_smooth"  # the sweep metric that ranked the registered trial
