#!/usr/bin/env bash
# The whole pipeline on the built-in synthetic cohort, with the embedded defaults:
# local Ray, MLflow on a local SQLite store under runs/. Each step is one `stence` command you can run alone.
set -euo pipefail
cd "$(dirname "$0")/.."
export STENCE_SALT="${STENCE_SALT:-demo-site-secret-change-me}"
export MLFLOW_DISABLE_TELEMETRY=true
S=.venv/bin/stence
RUNS="${RUNS:-runs}"
CFG="--config configs/demo.yaml --set data.cohort=$RUNS/cohort train.storage_path=$RUNS/ray"
t0=$(date +%s)
step() { echo; echo "==> [$(( $(date +%s) - t0 ))s] $*"; }

step "1/8 synthetic cohort in real clinical formats (WFDB, GE MUSE, HL7 aECG and DICOM ECGs; DICOM XA; annotations), 5 % corrupt files"
$S synth "$RUNS/raw" --size demo --ecg-format mixed --corrupt-fraction 0.05 --seed 0 --overwrite ${SYNTH_ARGS:-}

step "2/8 ingest: pseudonymise, quarantine bad files, pair, split by patient, cache"
$S ingest "$RUNS/raw" --out "$RUNS/cohort" --overwrite

step "3/8 stage A: angiography stenosis model (frame encoder + aggregator, end to end on the key frames)"
$S train-angio $CFG --name demo-angio --workers 0 --set optim.epochs=150 optim.batch_size=8 optim.lr_angio=1e-3
ANGIO="$RUNS/ray/exports/angio-demo-angio"
STAGE_A="model.angio_checkpoint=$ANGIO/aggregator.pt feature.frame_checkpoint=$ANGIO/frame_encoder.pt"

step "4/8 angiography patch features from the stage-A frame encoder (Ray Data)"
$S features $CFG --set $STAGE_A

step "5/8 StenCE sweep: Ray Tune + Optuna over W_Sten, temperature, learning rates; each trial a 2-worker DDP run"
$S tune $CFG --space default --num-samples "${DEMO_TRIALS:-3}" --max-concurrent 1 --set $STAGE_A

step "6/8 probe the champion and a random-init baseline on the four stenosis thresholds"
$S probe $CFG --workers 0 --encoder models:/stence-ecg-encoder@champion --label StenCE \
  --tasks 0_100 0_90 lt70_ge70 le50_ge99 --out "$RUNS/results/stence" --overwrite
$S probe $CFG --workers 0 --label baseline --tasks 0_100 0_90 lt70_ge70 le50_ge99 --out "$RUNS/results/baseline" \
  --overwrite
$S probe --compare "$RUNS/results/stence/results.json" "$RUNS/results/baseline/results.json" \
  --out "$RUNS/results/compare" --overwrite

step "7/8 registered models"
$S models

step "8/8 score and embed new ECGs of every format with the champion"
shopt -s nullglob
NEW=("$RUNS"/raw/ecg/E00000[0-7].{hea,xml,dcm})
$S predict --model models:/stence-ecg-encoder@champion "${NEW[@]}"
$S embed --model models:/stence-ecg-encoder@champion --out "$RUNS/results/embeddings.npz" --overwrite -- "${NEW[@]}"

echo
echo "done in $(( $(date +%s) - t0 )) s. Results: $RUNS/results/compare/results.md and fig2_auroc_vs_threshold.png"
echo "Open the MLflow UI on these runs:  make ui   (then http://127.0.0.1:5000)"
