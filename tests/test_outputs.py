"""No command destroys what it did not write: output folders are claimed with a marker (stence/outputs.py);
an unrelated folder, a folder holding the input, or another kind of output is refused with one line and
left byte-identical; an earlier output of the same command is replaced only with --overwrite."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from stence.cli import main
from stence.eval.metrics import bootstrap_ci
from stence.eval.report import write_json
from stence.outputs import MARKER, OutputRefused, check_output, claim_output, mark_output, output_kind

TINY = ["--size", "tiny", "--patients", "2", "--echonext", "0"]


def snapshot(root: Path) -> dict[str, str]:
    """Every path under root (folders, files, links) with a hash of each file's bytes."""
    out: dict[str, str] = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        if p.is_symlink():
            out[rel] = "link:" + os.readlink(p)
        elif p.is_dir():
            out[rel] = "dir"
        else:
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def unrelated(root: Path) -> Path:
    """A folder stence did not write, with names synth writes (the old --overwrite deleted those)."""
    root.mkdir(parents=True)
    (root / "notes.txt").write_text("keep me\n")
    (root / "ecg").mkdir()
    (root / "ecg" / "keep.hea").write_text("not ours\n")
    (root / "annotations.csv").write_text("study_uid,segment,stenosis\n")
    return root


def refused(capsys: pytest.CaptureFixture, code: int, *words: str) -> str:
    """Assert a refusal: non-zero exit and a one-line message on stderr naming `words`."""
    err = capsys.readouterr().err.strip()
    assert code != 0
    assert err and "\n" not in err and "Traceback" not in err, err
    for w in words:
        assert w in err, err
    return err


# --- stence/outputs.py ---------------------------------------------------------------------------------


def test_output_equal_to_inside_or_containing_the_input_is_refused(tmp_path: Path) -> None:
    src = tmp_path / "raw"
    (src / "sub").mkdir(parents=True)
    (src / "a.txt").write_text("x")
    before = snapshot(tmp_path)
    for out, why in ((src, "is the input"), (src / "sub", "inside the input"), (src / "new", "inside the input"),
                     (tmp_path, "contains the input")):
        for overwrite in (False, True):
            with pytest.raises(OutputRefused, match=why):
                claim_output(out, "synth", inputs=[src], overwrite=overwrite)
    with pytest.raises(OutputRefused, match="contains the input"):  # an input file inside the output
        check_output(tmp_path, "results", inputs=[src / "a.txt"], overwrite=True)
    with pytest.raises(OutputRefused, match="inside the input"):  # relative and absolute spellings agree
        check_output(os.path.relpath(src / "sub", Path.cwd()), "synth", inputs=[src])
    assert snapshot(tmp_path) == before
    sibling = claim_output(tmp_path / "raw2", "synth", inputs=[src])  # a name prefix is not "inside"
    assert output_kind(sibling) == "synth"


def test_unrelated_folder_or_file_is_refused_even_with_overwrite(tmp_path: Path) -> None:
    folder = unrelated(tmp_path / "mine")
    file = tmp_path / "file.txt"
    file.write_text("x")
    before = snapshot(tmp_path)
    for overwrite in (False, True):
        with pytest.raises(OutputRefused, match="did not write"):
            claim_output(folder, "synth", overwrite=overwrite)
        with pytest.raises(OutputRefused, match="not a folder"):
            claim_output(file, "synth", overwrite=overwrite)
    assert snapshot(tmp_path) == before
    assert output_kind(folder) is None


def test_new_or_empty_folder_is_claimed(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    for out in (tmp_path / "empty", tmp_path / "new" / "deeper"):
        path = claim_output(out, "results")
        assert path == out.resolve() and output_kind(out) == "results"
        assert json.loads((out / MARKER).read_text())["kind"] == "results"
        assert [p.name for p in out.iterdir()] == [MARKER]


def test_own_output_needs_overwrite_and_another_kind_is_refused(tmp_path: Path) -> None:
    out = mark_output(tmp_path / "cohort", "synth")
    (out / "data.csv").write_text("1\n")
    before = snapshot(tmp_path)
    with pytest.raises(OutputRefused, match="--overwrite"):
        claim_output(out, "synth")
    with pytest.raises(OutputRefused, match="pass --force"):
        check_output(out, "synth", flag="--force")
    for overwrite in (False, True):
        with pytest.raises(OutputRefused, match="holds a stence synth output, not a results"):
            claim_output(out, "results", overwrite=overwrite)
    assert snapshot(tmp_path) == before
    assert claim_output(out, "synth", overwrite=True) == out.resolve()
    assert (out / "data.csv").read_text() == "1\n"  # claiming replaces only the marker; the command cleans up


# --- stence synth --------------------------------------------------------------------------------------


def test_synth_refuses_an_unrelated_folder_with_and_without_overwrite(tmp_path: Path, capsys) -> None:
    folder = unrelated(tmp_path / "mine")
    before = snapshot(folder)
    refused(capsys, main(["synth", str(folder), *TINY]), str(folder.resolve()), "did not write")
    refused(capsys, main(["synth", str(folder), *TINY, "--overwrite"]), "did not write")
    assert snapshot(folder) == before
    file = tmp_path / "file"
    file.write_text("x")
    refused(capsys, main(["synth", str(file), *TINY, "--overwrite"]), "not a folder")
    assert file.read_text() == "x"
    other = mark_output(tmp_path / "results", "results")
    other_before = snapshot(other)
    refused(capsys, main(["synth", str(other), *TINY, "--overwrite"]), "results")
    assert snapshot(other) == other_before


def test_synth_replaces_its_own_output_only_with_overwrite(tmp_path: Path, capsys) -> None:
    out = tmp_path / "raw"
    out.mkdir()  # an empty folder is fine
    assert main(["synth", str(out), *TINY]) == 0
    assert output_kind(out) == "synth" and (out / "synth_truth.json").is_file()
    capsys.readouterr()
    before = snapshot(out)
    refused(capsys, main(["synth", str(out), *TINY, "--seed", "5"]), "--overwrite")
    assert snapshot(out) == before
    (out / "ecg" / "E000000.dat").write_bytes(b"damaged")  # an earlier output, changed since
    (out / "my_notes.txt").write_text("mine\n")  # a file synth never writes stays
    assert main(["synth", str(out), *TINY, "--overwrite"]) == 0
    after = snapshot(out)
    assert after.pop("my_notes.txt") and (out / "my_notes.txt").read_text() == "mine\n"
    assert {k: v for k, v in after.items() if k != MARKER} == {k: v for k, v in before.items() if k != MARKER}
    assert output_kind(out) == "synth"


# --- stence probe / finetune ---------------------------------------------------------------------------


def _results(folder: Path, name: str, effect: float) -> Path:
    rng = np.random.default_rng(7)
    y = rng.integers(0, 2, 60)
    p = rng.normal(size=60) + effect * y
    folder.mkdir(parents=True, exist_ok=True)
    return write_json({name: {"0_100": bootstrap_ci(y, p, n_boot=20, seed=0)}}, folder / f"{name}.json")


def test_compare_refuses_an_out_holding_its_inputs(tmp_path: Path, capsys) -> None:
    res = tmp_path / "res"
    a, b = _results(res, "a", 1.0), _results(res / "b", "b", 0.2)
    before = snapshot(tmp_path)
    for out in (res, tmp_path, res / "b"):  # contains a.json / contains both / contains b.json
        for extra in ([], ["--overwrite"]):
            refused(capsys, main(["probe", "--compare", str(a), str(b), "--out", str(out), *extra]),
                    "contains the input")
    refused(capsys, main(["probe", "--compare", str(a), str(b), "--out", str(a)]), "is the input")
    assert snapshot(tmp_path) == before


def test_compare_refuses_an_unrelated_out_and_replaces_its_own_with_overwrite(tmp_path: Path, capsys) -> None:
    a, b = _results(tmp_path / "a", "a", 1.0), _results(tmp_path / "b", "b", 0.2)
    folder = unrelated(tmp_path / "mine")
    before = snapshot(folder)
    for extra in ([], ["--overwrite"]):
        refused(capsys, main(["finetune", "--compare", str(a), str(b), "--out", str(folder), *extra]),
                "stence finetune:", "did not write")
    assert snapshot(folder) == before

    out = tmp_path / "cmp"
    assert main(["probe", "--compare", str(a), str(b), "--out", str(out)]) == 0
    assert output_kind(out) == "results" and (out / "results.json").is_file() and (out / "delong.json").is_file()
    capsys.readouterr()
    earlier = snapshot(out)
    refused(capsys, main(["probe", "--compare", str(a), "--out", str(out)]), "--overwrite")
    assert snapshot(out) == earlier
    assert main(["probe", "--compare", str(a), "--out", str(out), "--overwrite"]) == 0
    assert set(json.loads((out / "results.json").read_text())) == {"a"}  # replaced


def test_compare_default_out_is_replaced_on_a_rerun(tmp_path: Path, monkeypatch, capsys) -> None:
    a, b = _results(tmp_path / "in" / "a", "a", 1.0), _results(tmp_path / "in" / "b", "b", 0.2)
    monkeypatch.chdir(tmp_path)
    for _ in range(2):
        assert main(["probe", "--compare", str(a), str(b)]) == 0
    assert output_kind(tmp_path / "runs" / "results" / "compare") == "results"
    assert set(json.loads((tmp_path / "runs/results/compare/results.json").read_text())) == {"a", "b"}


def test_probe_refuses_a_bad_out_before_training(tmp_path: Path, capsys) -> None:
    cohort = tmp_path / "cohort"
    cohort.mkdir()
    (cohort / "meta.json").write_text("{}")
    folder = unrelated(tmp_path / "mine")
    before = snapshot(tmp_path)
    common = ["--set", f"data.cohort={cohort}", f"train.storage_path={tmp_path / 'ray'}", "tracking.enabled=false"]
    for out, why in ((folder, "did not write"), (cohort, "is the input"), (cohort / "results", "inside the input"),
                     (tmp_path, "contains the input")):
        for extra in ([], ["--overwrite"]):
            refused(capsys, main(["probe", "--out", str(out), *extra, *common]), why)
    assert snapshot(tmp_path) == before  # nothing trained, nothing written


# --- exports, fetched models ---------------------------------------------------------------------------


def test_exports_reuse_their_own_folder_and_refuse_a_foreign_one(tmp_path: Path) -> None:
    from stence.config import Config
    from stence.pipelines.stage_runs import EXPORT_KIND
    from stence.pipelines.stage_runs import output_dir as _output_dir

    cfg = Config()
    cfg = replace(cfg, train=replace(cfg.train, storage_path=str(tmp_path / "ray")))
    out = _output_dir(cfg, "probe", "run")
    assert output_kind(out) == EXPORT_KIND
    (out / "scorer.pt").write_bytes(b"w")
    assert _output_dir(cfg, "probe", "run") == out and (out / "scorer.pt").read_bytes() == b"w"  # a resume
    foreign = unrelated(tmp_path / "ray" / "exports" / "probe-foreign")
    before = snapshot(foreign)
    with pytest.raises(OutputRefused, match="did not write"):
        _output_dir(cfg, "probe", "foreign")
    assert snapshot(foreign) == before


def test_fetch_refuses_to_download_into_a_foreign_folder(tmp_path: Path) -> None:
    from stence.serving.fetch import fetch_scorer

    folder = unrelated(tmp_path / "mine")
    before = snapshot(folder)
    with pytest.raises(OutputRefused, match="did not write"):
        fetch_scorer("models:/no-such-model@champion", folder, uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert snapshot(folder) == before


def test_feature_cache_refuses_a_foreign_folder(tmp_path: Path, monkeypatch) -> None:
    import stence.train.features as features
    from stence.config import Config

    cache = tmp_path / "cohort" / "features" / "key"
    monkeypatch.setattr(features.Cohort, "open", staticmethod(lambda root: None))
    monkeypatch.setattr(features, "features_dir", lambda cohort, cfg: cache)
    unrelated(cache)
    before = snapshot(tmp_path)
    with pytest.raises(OutputRefused, match="did not write"):
        features.extract_features(Config(), cohort_root=tmp_path / "cohort", progress=False)
    assert snapshot(tmp_path) == before
