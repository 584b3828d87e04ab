"""MLflow tracking: import from the module that does the job (nothing is re-exported here, so importing
one piece never loads the others).

  tags.py         every tag key the platform writes or reads
  client.py       the project directory, tracking URI, artifact and spool locations, the one MlflowClient
  runs.py         start/find runs; Tracker (rank 0) and NullTracker; the per-worker loop's tracking entries
  spool.py        the write-ahead spool file between trackers and the store
  replay.py       replaying a spool to MLflow (`stence runs replay`)
  writer.py       the per-file background writer that replays while training goes on
  owner.py        which process drives a run, and whether it is alive
  repair.py       ending orphaned RUNNING runs (`stence runs repair`)
  lineage.py      the cohort a run read, as an MLflow dataset input
  evaluations.py  evaluation and comparison runs (`stence probe`, `stence finetune`, ablations)
"""
