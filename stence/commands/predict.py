"""`stence predict --model REF RECORD ...`: a stenosis probability per ECG, or a clear error per bad one."""

from __future__ import annotations

import argparse
import json
import os
import sys

from stence.commands._common import RAW, add_config_args, config_from_args

EXAMPLE = """example:
  stence predict --model models:/stence-ecg-encoder@champion new_ecgs/*.hea
  stence predict --model models:/stence-ecg-encoder/3 new_ecgs/ --json > scores.json
  stence predict --model runs/ray/exports/probe-stence-probe-0_100/scorer.pt HR06000.hea
  stence predict --set tracking.uri=sqlite:////data/mlflow.db -- new_ecgs/*.hea   # `--` ends --set

Each record (WFDB, or a GE MUSE, Philips, HL7 aECG or DICOM ECG export, recognised by content) is read at its
own sampling rate and lead order (leads are picked by name) and prepared by the model's input contract
exactly as in evaluation. A folder stands for every record under it; a folder with none is reported as
an error. Every argument gets a probability or one error line (with
--json: a row with "error" and "reason"), and the others are still scored. Records over the ingest limits
(sampling rate outside ingest.min_fs..ingest.max_fs, longer than ingest.max_duration_s, more than
ingest.max_channels signals, a header over ingest.max_header_kb, decoding to more than
ingest.max_decoded_mb) are refused before reading; raise a limit with e.g. --set ingest.max_duration_s=3600.
Exit code 0 if every record was scored, 1 if any argument failed or the model could not be loaded.
The registry lives at the tracking URI (tracking.uri, MLFLOW_TRACKING_URI or runs/mlflow.db).

Before the scores, one line on stderr names what scored them: the registered model, the version an alias
pointed at (that exact version is the one downloaded), its run and its lineage tags (sweep, metric,
cohort, commit, config, promotion), e.g.
  model stence-ecg-encoder version 7 (run 3f2a..., alias champion) sweep=..., metric=0_100/auroc 0.81 [...]
with a warning when the version carries no stence lineage, when no stence promotion moved the alias to
it, or when every record got the same probability. stdout (the table, or --json rows) is unchanged."""


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("predict", help="score ECG records (WFDB, MUSE, Philips, HL7 aECG, DICOM ECG) with a registered model",
                       description=__doc__, epilog=EXAMPLE, formatter_class=RAW)
    p.add_argument("records", nargs="+", metavar="RECORD",
                   help="ECG records (WFDB .hea, GE MUSE / Philips / HL7 aECG XML, DICOM ECG) or folders of them")
    p.add_argument("--model", default=None,
                   help="models:/NAME@ALIAS, models:/NAME/VERSION, runs:/RUN_ID, or a scorer.pt "
                   "(default: models:/<tracking.registered_model>@champion)")
    p.add_argument("--json", action="store_true", help="print one JSON list of {record, probability, error}")
    add_config_args(p)
    p.set_defaults(func=run)


def _print_table(rows: list[dict]) -> None:
    width = max(len(r["record"]) for r in rows)
    for r in rows:
        if r["error"]:
            print(f"{r['record']:<{width}}  ERROR {r['error']}")
        else:
            p = r["probability"]
            shown = f"{p:.4f}" if isinstance(p, float) else " ".join(f"{v:.4f}" for v in p)
            print(f"{r['record']:<{width}}  {shown}")


def _report_lineage(model: object) -> None:
    """Which registered version (and run) is about to score, with its lineage tags and warnings, on stderr."""
    lineage = getattr(model, "lineage", None)
    if lineage is not None:
        print(lineage.describe(), file=sys.stderr)
        for w in lineage.warnings():
            print(f"warning: {w}", file=sys.stderr)


def _warn_if_uniform(rows: list[dict]) -> None:
    """Warn (stderr) when every scored record shows the same output at the printed precision: a broken or
    swapped model (e.g. a huge negative bias gives 0.0000 everywhere), never a real cohort."""
    shown = [" ".join(f"{v:.4f}" for v in (p if isinstance(p, list) else [p]))
             for p in (r["probability"] for r in rows if r["error"] is None)]
    if len(shown) >= 2 and len(set(shown)) == 1:
        print(f"warning: all {len(shown)} scored records got the same output {shown[0]}: the model may be "
              "broken or not the one you meant; check its lineage above", file=sys.stderr)


def _load_hint(message: str) -> str:
    """What to do about a model that did not load (an authenticated server answers 401 / 403)."""
    if "401" in message:
        return ("  the MLflow server needs a user: export MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD "
                "(or keep them in ~/.mlflow/credentials)")
    if "403" in message:
        return ("  your MLflow user has no permission on this model: ask the admin for READ "
                "(stence cluster user grant USER --model NAME --permission READ)")
    return "  list registered versions with `stence models`; register one with `stence register RUN_ID`"


def run(args: argparse.Namespace) -> int:
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    cfg = config_from_args(args)
    # the pipeline pulls in torch and MLflow: imported here so `stence --help` stays fast
    from stence.pipelines.predict import ModelNotLoaded, score_records

    try:
        scored = score_records(cfg, args.records, args.model, on_loaded=_report_lineage)
    except ModelNotLoaded as e:  # unknown alias, missing run, unreadable file: say which and what to do
        print(f"error: {e}\n{_load_hint(str(e.cause))}")
        return 1
    rows = scored.rows
    _warn_if_uniform(rows)
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        _print_table(rows)
    n_ok = scored.n_ok
    if not args.json:
        lineage = getattr(scored.model, "lineage", None)
        version = f"version {lineage.version}, " if lineage is not None and lineage.version else ""
        print(f"scored {n_ok} of {len(rows)} record(s) with {scored.ref} ({version}task "
              f"{scored.model.metadata['task']})")
    return 0 if n_ok == len(rows) else 1
