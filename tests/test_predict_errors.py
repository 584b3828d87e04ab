"""`stence predict` accounts for every argument: a score, or one error line saying why (folders, empty
folders, implausible sampling rates, records over the ingest limits), and a non-zero exit when any failed.
It also says what scored them: the registered version behind an alias, its run and lineage tags, with
warnings for a champion that no stence promotion put there and for a model that scores every record alike.

Runs the real command on records written into tmp_path, with a tiny untrained scorer file as the model.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import wfdb

from stence.cli import main
from stence.config import STANDARD_LEADS, Config, to_dict
from stence.models.heads import ClassifierHead
from stence.models.registry import create_ecg_encoder
from stence.models.scorer import load_scorer, save_scorer, scorer_metadata
from stence.serving import registry as reg
from stence.serving.predict import NO_RECORDS, expand_records, predict_records
from stence.tracking.client import global_tracking_uri
from stence.tracking.tags import METRIC_TAG
from tests.ray_fixture import shared_mlflow_db

FS = 500


@pytest.fixture(scope="module")
def scorer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained otis_tiny scorer file (3 s at 500 Hz): enough to run the whole predict path."""
    torch.manual_seed(0)
    enc = create_ecg_encoder("otis_tiny", fs=FS, n_samples=1500)
    path = tmp_path_factory.mktemp("scorer") / "scorer.pt"
    save_scorer(path, enc, ClassifierHead(enc.embed_dim, 1), "0_100", to_dict(Config()), {"auroc": 0.5})
    return path


def _write_record(d: Path, name: str, seed: int = 0) -> Path:
    """A 10 s 12-lead record with lead-like variation; returns its .hea path."""
    d.mkdir(parents=True, exist_ok=True)
    t = np.arange(10 * FS) / FS
    rng = np.random.default_rng(seed)
    sig = np.stack([np.sin(2 * np.pi * (1 + i / 7) * t) + rng.normal(0, 0.05, t.size) for i in range(12)], 1)
    wfdb.wrsamp(name, fs=FS, units=["mV"] * 12, sig_name=list(STANDARD_LEADS), p_signal=sig, fmt=["16"] * 12,
                adc_gain=[1000.0] * 12, baseline=[0] * 12, write_dir=str(d))  # fmt: skip
    return d / f"{name}.hea"


def _with_record_line(hea: Path, line: str) -> Path:
    lines = hea.read_text().splitlines(keepends=True)
    hea.write_text("".join([line + "\n", *lines[1:]]))
    return hea


@pytest.fixture
def args_mix(tmp_path: Path) -> dict[str, Path]:
    good = _write_record(tmp_path, "good")
    folder = tmp_path / "folder"
    _write_record(folder, "a", seed=1)
    _write_record(folder / "sub", "b", seed=2)
    empty = tmp_path / "empty"
    empty.mkdir()
    bad_rate = _with_record_line(_write_record(tmp_path, "badrate"), f"badrate 12 1e9 {10 * FS}")
    long = _write_record(tmp_path, "long")
    _with_record_line(long, f"long 12 {FS} {FS * 3600}")  # 1 h, over the 600 s default
    (tmp_path / "long.dat").unlink()  # refused from the header alone
    return {"good": good, "folder": folder, "empty": empty, "bad_rate": bad_rate, "long": long,
            "absent": tmp_path / "absent.hea"}  # fmt: skip


def _argv(scorer: Path, tmp_path: Path, records: list[Path], *sets: str, as_json: bool = True) -> list[str]:
    """`stence predict` arguments: the scorer file as the model, a throwaway tracking URI, `--set` extras."""
    argv = ["predict", *(["--json"] if as_json else []), "--model", str(scorer),
            "--set", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}", *sets, "--", *map(str, records)]  # fmt: skip
    return argv


def test_every_argument_gets_a_score_or_one_error(scorer: Path, args_mix: dict[str, Path], tmp_path: Path,
                                                  capsys: pytest.CaptureFixture) -> None:  # fmt: skip
    a = args_mix
    order = [a["good"], a["folder"], a["empty"], a["bad_rate"], a["long"], a["absent"]]
    assert main(_argv(scorer, tmp_path, order)) == 1  # some failed
    rows = json.loads(capsys.readouterr().out)
    folder_records = [str(a["folder"] / "a.hea"), str(a["folder"] / "sub" / "b.hea")]
    expected = [str(a["good"]), *folder_records, str(a["empty"]), str(a["bad_rate"]), str(a["long"]),
                str(a["absent"])]  # fmt: skip
    assert [r["record"] for r in rows] == expected  # in argument order, the folder expanded in place
    by = {r["record"]: r for r in rows}
    for rec in [str(a["good"]), *folder_records]:
        assert by[rec]["error"] is None and 0.0 <= by[rec]["probability"] <= 1.0
    for rec in (a["empty"], a["bad_rate"], a["long"], a["absent"]):
        assert by[str(rec)]["probability"] is None and by[str(rec)]["error"]
    assert by[str(a["empty"])]["reason"] == NO_RECORDS and "no ECG records" in by[str(a["empty"])]["error"]
    assert by[str(a["bad_rate"])]["reason"] == "ecg_bad_header"
    assert "implausible sampling rate '1e9'" in by[str(a["bad_rate"])]["error"]
    assert by[str(a["long"])]["reason"] == "file_over_limit"
    assert "ingest.max_duration_s" in by[str(a["long"])]["error"]
    assert by[str(a["absent"])]["reason"] == "ecg_bad_header" and "not found" in by[str(a["absent"])]["error"]

    # the table says the same: one line per record, one ERROR line per failed argument, and the count
    assert main(_argv(scorer, tmp_path, order, as_json=False)) == 1
    out = capsys.readouterr().out.splitlines()
    assert len(out) == len(expected) + 1 and out[-1].startswith("scored 3 of 7 record(s)")
    for line, rec in zip(out[:-1], expected, strict=True):
        assert line.startswith(rec)
        assert ("ERROR" in line) == (by[rec]["error"] is not None)


def test_all_good_exits_zero_and_ingest_limits_come_from_the_config(
    scorer: Path, args_mix: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    a = args_mix
    assert main(_argv(scorer, tmp_path, [a["good"], a["folder"]])) == 0
    assert all(r["error"] is None for r in json.loads(capsys.readouterr().out))
    # raising ingest.max_duration_s lets the 1 h header through its limit; its absent signal file is next
    assert main(_argv(scorer, tmp_path, [a["long"]], "ingest.max_duration_s=7200")) == 1
    (row,) = json.loads(capsys.readouterr().out)
    assert row["reason"] == "ecg_missing_signal_file"
    # raising ingest.max_fs does not make 1e9 Hz readable: wfdb reads it as 1 Hz, which is refused
    assert main(_argv(scorer, tmp_path, [a["bad_rate"]], "ingest.max_fs=2e9")) == 1
    (row,) = json.loads(capsys.readouterr().out)
    assert row["reason"] == "ecg_bad_header" and "reads it as 1 Hz" in row["error"]


def test_library_folder_handling(scorer: Path, args_mix: dict[str, Path], tmp_path: Path) -> None:
    """expand_records keeps an empty folder as itself; predict_records given a folder says what to pass."""
    a = args_mix
    assert expand_records([a["empty"], a["good"]]) == [a["empty"], a["good"]]
    rows = predict_records(load_scorer(scorer), [a["folder"], a["empty"]])
    assert [r["reason"] for r in rows] == [NO_RECORDS, NO_RECORDS]
    assert "DIR/*.hea" in rows[0]["error"] and "no ECG records" in rows[1]["error"]


# ---------------------------------------------------------------------------------------------------
# which model scored: lineage of the registered version, and a swapped champion made visible


def _biased_scorer(path: Path, bias: float) -> Path:
    """The tiny scorer with a huge head bias: sigmoid(-40) prints 0.0000 for every record."""
    torch.manual_seed(1)
    enc = create_ecg_encoder("otis_tiny", fs=FS, n_samples=1500)
    head = ClassifierHead(enc.embed_dim, 1)
    with torch.no_grad():
        head.fc.bias.fill_(bias)
    save_scorer(path, enc, head, "0_100", to_dict(Config()), {"auroc": 0.5})
    return path


def _model_line(err: str) -> str:
    """The lineage line among stderr's lines (MLflow may log there too)."""
    lines = [ln for ln in err.splitlines() if ln.startswith("model ")]
    assert len(lines) == 1, err
    return lines[0]


def _warnings(err: str) -> list[str]:
    return [ln for ln in err.splitlines() if ln.startswith("warning:")]


def test_predict_names_the_version_and_shows_a_swapped_champion(scorer: Path, tmp_path: Path,
                                                                 tmp_path_factory: pytest.TempPathFactory,
                                                                 capsys: pytest.CaptureFixture) -> None:
    import mlflow

    db = shared_mlflow_db(tmp_path_factory)
    client = mlflow.MlflowClient(tracking_uri=db, registry_uri=db)
    exp = client.create_experiment(f"predict-lineage-{tmp_path.name}", artifact_location=str(tmp_path / "artifacts"))
    name = f"stence-lineage-{tmp_path.name}"[:60]
    records = [_write_record(tmp_path / "ecg", "a", seed=1), _write_record(tmp_path / "ecg", "b", seed=2)]

    # v1: registered and promoted the stence way (provenance tags + promotion record)
    run1 = client.create_run(exp).info.run_id
    tags = reg.scorer_version_tags(scorer_metadata(scorer), cohort="cohortA", sweep="sweep-7", commit="abc1234")
    v1 = reg.register(reg.log_scorer(scorer, run1, db), name, tags, uri=db)
    assert reg.promote_if_better(name, v1, tags[METRIC_TAG], 0.5, 0.45, "cohortA", strict=False, uri=db)
    argv = ["predict", "--json", "--model", f"models:/{name}@champion", "--set", f"tracking.uri={db}", "--",
            *map(str, records)]
    assert main(argv) == 0
    out = capsys.readouterr()
    rows = json.loads(out.out)  # stdout: the same rows as before, nothing else
    assert [sorted(r) for r in rows] == [["error", "probability", "reason", "record"]] * 2
    line = _model_line(out.err)
    assert line.startswith(f"model {name} version {v1} (run {run1}, alias champion) ")
    for part in ("sweep=sweep-7", "metric=0_100/auroc 0.5000", "cohort=cohortA", "commit=abc1234",
                 "promotion=promoted to champion"):
        assert part in line, line
    assert not _warnings(out.err), out.err

    # v2: a -40 bias scorer registered and made champion straight through the MLflow API, as an
    # anonymous client did on an open server: no lineage tags, no promotion record
    run2 = client.create_run(exp).info.run_id
    bad = reg.log_scorer(_biased_scorer(tmp_path / "bad" / "scorer.pt", -40.0), run2, db)
    with global_tracking_uri(db):  # the registry resolves a models:/ source through the global URI
        v2 = client.create_model_version(name, source=bad, run_id=run2, model_id=bad.removeprefix("models:/")).version
    client.set_registered_model_alias(name, "champion", v2)
    assert main(argv) == 0
    out = capsys.readouterr()
    assert [r["probability"] for r in json.loads(out.out)] == [pytest.approx(0.0, abs=1e-12)] * 2
    err = out.err
    assert f"model {name} version {v2} (run {run2}, alias champion) sweep=-" in err
    assert "carries no stence lineage tags" in err
    assert "no record that stence moved @champion" in err
    assert "all 2 scored records got the same output 0.0000" in err

    # the table form says the version too, and a pinned version reports itself without an alias
    assert main(["predict", "--model", f"models:/{name}/{v1}", "--set", f"tracking.uri={db}", "--",
                 *map(str, records)]) == 0
    out = capsys.readouterr()
    assert out.out.splitlines()[-1].startswith(f"scored 2 of 2 record(s) with models:/{name}/{v1} (version {v1},")
    assert _model_line(out.err).startswith(f"model {name} version {v1} (run {run1}) ")
    assert not _warnings(out.err), out.err


# ---------------------------------------------------------------------------------------------------
# hospital formats: every supported export scores like a WFDB record


def test_vendor_exports_score_like_their_wfdb_twin(scorer: Path, shared_data: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture) -> None:  # fmt: skip
    import pydicom.data

    from stence.data.synth import SynthConfig, write_cohort

    twins = {}
    for fmt in ("wfdb", "muse", "hl7", "dicom"):
        write_cohort(tmp_path / fmt, SynthConfig.preset("tiny", patients=1, ecgs_per_patient=1, ecg_format=fmt))
        twins[fmt] = next(p for p in sorted((tmp_path / fmt / "ecg").iterdir()) if p.suffix != ".dat")
    rows = predict_records(load_scorer(scorer), list(twins.values()))
    assert all(r["error"] is None for r in rows), rows
    p = {fmt: r["probability"] for fmt, r in zip(twins, rows, strict=True)}
    assert p["hl7"] == pytest.approx(p["wfdb"], abs=1e-3) and p["dicom"] == pytest.approx(p["wfdb"], abs=1e-6)
    assert abs(p["muse"] - p["wfdb"]) < 0.05  # MUSE derives its limb leads: close, not equal
    # the real samples, and a folder of them (recognised by content, whatever their names)
    folder = tmp_path / "exports"
    folder.mkdir()
    for f in [*sorted((shared_data / "ecg_vendor").iterdir()), Path(pydicom.data.get_testdata_file("waveform_ecg.dcm"))]:
        (folder / f"{f.stem}.export").write_bytes(f.read_bytes())
    (folder / "notes.txt").write_text("not an ECG\n")
    assert main(_argv(scorer, tmp_path, [folder])) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 4 and all(r["error"] is None and 0 <= r["probability"] <= 1 for r in rows)
