"""`stence predict` accounts for every argument: a score, or one error line saying why (folders, empty
folders, implausible sampling rates, records over the ingest limits), and a non-zero exit when any failed.

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
from stence.serving.predict import NO_RECORDS, expand_records, predict_records
from stence.serving.scorer import load_scorer, save_scorer

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
    assert by[str(a["empty"])]["reason"] == NO_RECORDS and "no WFDB records" in by[str(a["empty"])]["error"]
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
    assert "DIR/*.hea" in rows[0]["error"] and "no WFDB records" in rows[1]["error"]
