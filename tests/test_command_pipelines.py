"""The pipeline functions the commands call (each command is its arguments plus one of these): what they
return and refuse, without a command line. Cheap: no training, no tracking store."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from stence.config import Config, apply_overrides
from stence.eval.metrics import bootstrap_ci
from stence.eval.report import write_json
from stence.outputs import OutputRefused, output_kind
from stence.pipelines.compare import DEFAULT_COMPARE_OUT, compare_files
from stence.pipelines.embed import npz_path
from stence.pipelines.register import source_run_id
from stence.pipelines.runs import NoSuchSpool, spool_files
from stence.pipelines.scaler import ScalerRefused, convert_scaler, lead_order
from stence.pipelines.ui import mlflow_ui
from stence.tracking.spool import SPOOL_NAME


def _cfg(**overrides: object) -> Config:
    return apply_overrides(Config(), {"tracking.enabled": False, **overrides})


def _results(path: Path, name: str, effect: float) -> Path:
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 60)
    p = rng.normal(size=60) + effect * y
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_json({name: {"0_100": bootstrap_ci(y, p, n_boot=20, seed=0)}}, path)


def test_compare_files_merges_into_its_default_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = _results(tmp_path / "in" / "a.json", "a", 1.0), _results(tmp_path / "in" / "b.json", "b", 0.2)
    monkeypatch.chdir(tmp_path)
    done = compare_files(_cfg(), [a, b])
    assert done.out == Path(DEFAULT_COMPARE_OUT) and output_kind(done.out) == "results"
    assert set(done.results) == {"a", "b"} and done.run_id is None and done.delong == []  # no prediction files
    assert set(json.loads((done.out / "results.json").read_text())) == {"a", "b"}
    assert "no paired DeLong test" in done.md.read_text()
    with pytest.raises(OutputRefused, match="--overwrite"):  # an explicit earlier folder needs overwrite
        compare_files(_cfg(), [a], done.out)
    again = compare_files(_cfg(), [a], done.out, overwrite=True)
    assert set(json.loads((again.out / "results.json").read_text())) == {"a"}  # replaced


def test_spool_files_refuse_a_missing_path_before_replaying(tmp_path: Path) -> None:
    (tmp_path / "b").mkdir()
    (tmp_path / "a").mkdir()
    for d in ("b", "a"):
        (tmp_path / d / SPOOL_NAME).write_text("")
    single = tmp_path / "other.jsonl"
    single.write_text("")
    assert spool_files([tmp_path, single]) == [tmp_path / "a" / SPOOL_NAME, tmp_path / "b" / SPOOL_NAME, single]
    with pytest.raises(NoSuchSpool, match="no such spool file or folder"):
        spool_files([tmp_path, tmp_path / "missing"])


def test_ui_runs_nothing_for_a_remote_store_and_only_plans_a_dry_run(tmp_path: Path) -> None:
    remote = mlflow_ui(_cfg(**{"tracking.uri": "http://mlflow.example:5000"}), "127.0.0.1", 5000)
    assert not remote.local and remote.cmd == [] and remote.returncode is None
    db = tmp_path / "store" / "mlflow.db"
    dry = mlflow_ui(_cfg(**{"tracking.uri": f"sqlite:///{db}"}), "0.0.0.0", 5055, "ui.example", dry_run=True)
    assert dry.local and dry.returncode is None and not db.parent.exists()  # nothing created
    assert dry.cmd[dry.cmd.index("--port") + 1] == "5055" and dry.cmd[-2:] == ["--allowed-hosts", "ui.example"]


def test_scaler_conversion_refusals_carry_their_exit_code(tmp_path: Path) -> None:
    src = tmp_path / "scaler.pkl"
    src.write_bytes(b"not a pickle")
    with pytest.raises(ScalerRefused, match="must end in .json") as e:
        convert_scaler(src, tmp_path / "scaler.txt")
    assert e.value.code == 2
    out = tmp_path / "scaler.json"
    with pytest.raises(ScalerRefused) as e:
        convert_scaler(src, out)
    assert e.value.code == 1 and not out.exists() and not (tmp_path / "scaler.tmp.json").exists()
    assert lead_order(None) is None and lead_order("I, II") == ["I", "II"] and len(lead_order("standard")) == 12


def test_small_resolutions() -> None:
    assert npz_path("emb") == Path("emb.npz") and npz_path("emb.npz") == Path("emb.npz")
    assert source_run_id("runs:/abc/model") == "abc" and source_run_id("abc") == "abc"
