"""Pipelines: each owns the order of the steps of one job, and every command (and every sweep trial) calls one.

  angio.py       stage A: the angiography stenosis model (`stence train-angio`)
  pretrain.py    stage B: StenCE pretraining (`stence pretrain`, each trial of `stence tune`)
  downstream.py  stage C: one probe / fine-tune task (`run_downstream`) and one evaluation of several
                 tasks as an MLflow run tree (`evaluate`; `stence probe`, `stence finetune`, the ablation)
  compare.py     a comparison of evaluations: table, paired tests, Fig. 2 and its MLflow run
  stage_runs.py  what the training pipelines share: their MLflow run, export folder and selected checkpoint
Ingest (`stence.data.ingest.ingest`), feature extraction (`stence.train.features.extract_features`) and the
sweep (`tune/`) are pipelines of their own packages.
"""
