"""Pipelines: each owns the order of the steps of one job, and every command (and every sweep trial) calls one.

  angio.py       stage A: the angiography stenosis model (`stence train-angio`)
  pretrain.py    stage B: StenCE pretraining (`stence pretrain`, each trial of `stence tune`)
  downstream.py  stage C: one probe / fine-tune task (`run_downstream`), one evaluation of several tasks as an
                 MLflow run tree (`evaluate_encoder`: the ablation's variants), and `stence probe` /
                 `stence finetune` as a whole (`probe_pipeline`)
  compare.py     a comparison of evaluations: table, paired tests, Fig. 2 and its MLflow run
                 (`compare_files`: `stence probe --compare`; `compare_results`: the ablation's table)
  register.py    register a scorer and promote it (`stence register`, the sweep's champion); `stence models`
  predict.py     score ECG records with a registered model (`stence predict`)
  embed.py       ECG embeddings under the encoder's input contract (`stence embed`)
  ingest.py      a raw export -> a pseudonymised cohort (`stence ingest`; the steps are stence.data.ingest's)
  scaler.py      EchoingECG's pickled scaler -> scaler JSON (`stence scaler convert`)
  runs.py        replay buffered tracking (`stence runs replay`)
  ui.py          the MLflow UI on the local store (`stence ui`)
  stage_runs.py  what the training pipelines share: their MLflow run, export folder, selected checkpoint and
                 the export of a pretrained encoder
Feature extraction (`stence.train.features.extract_features`, `stence features`), synthetic cohorts
(`stence.data.synth.write_cohort`, `stence synth`) and the sweep (`tune/`, `stence tune`; its run repair,
`stence runs repair`) are pipelines of their own packages.
"""
