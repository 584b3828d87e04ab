"""User-supplied model files load weights-only: a malicious pickle is refused and runs nothing; the OTIS
checkpoint is checked against the input contract; the EchoingECG scaler is converted from its pickle
without unpickling code, validated, and reaches the encoder through `model.ecg_scaler`."""

from __future__ import annotations

import argparse
import json
import os
import pickle
import re
import subprocess
import sys
import uuid
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from stence.cli import main as stence_main
from stence.config import Config, apply_overrides
from stence.data.contract_apply import window_part
from stence.models.base import MIMIC_LEADS
from stence.models.echoingecg import load_echoingecg_checkpoint
from stence.models.frame_encoder import load_dinov2_checkpoint
from stence.models.otis import load_otis_checkpoint
from stence.models.registry import build_ecg_encoder, create_frame_encoder
from stence.models.safe_load import (
    SAFE_GLOBALS,
    CheckpointError,
    ContractWarning,
    load_scaler,
    read_scaler_pickle,
    safe_torch_load,
)
from tests.test_checkpoints_compat import echoingecg_public_state, otis_public_state, save_otis

pytestmark = pytest.mark.usefixtures("one_thread")  # small models: no OpenMP spinning (conftest)

GOLDEN = Path(__file__).resolve().parents[1].parent / "shared" / "golden"


@pytest.fixture(scope="module")
def golden() -> Path:
    """Upstream-made reference files (../shared/golden); skip on a clone without ../shared."""
    if not GOLDEN.is_dir():
        pytest.skip(f"golden fixtures not found at {GOLDEN} (a fresh clone has no ../shared)")
    return GOLDEN


def cfg_with(**overrides) -> Config:
    return apply_overrides(Config(), {k.replace("__", "."): v for k, v in overrides.items()})


# ---------------------------------------------------------------------------------------------------
# malicious pickles


class RunsShell:
    """Unpickling this calls os.system (the pickle names `posix.system`)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class RunsEval:
    """Unpickling this calls builtins.eval."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (eval, (f"open({str(self.marker)!r}, 'w').close()",))


PAYLOADS = {"os.system": RunsShell, "builtins.eval": RunsEval}
REFUSED = {"os.system": r"posix\.system", "builtins.eval": r"builtins\.eval"}


def write_payload(path: Path, kind: str, marker: Path, fmt: str) -> Path:
    """A checkpoint-looking file whose loading would run `kind`: torch's zip format or a plain pickle."""
    obj = {"model": {}, "args": PAYLOADS[kind](marker)}
    if fmt == "zip":
        torch.save(obj, path)
    else:
        path.write_bytes(pickle.dumps(obj, protocol=2))
    return path


def test_payloads_are_live(tmp_path):
    """The files the refusal tests use do run code when unpickled plainly (so their refusal means something)."""
    for kind in PAYLOADS:
        marker = tmp_path / f"pwned-{uuid.uuid4().hex}"
        pickle.loads(write_payload(tmp_path / "x.pkl", kind, marker, "pickle").read_bytes())
        assert marker.exists(), kind


def _load_otis(path: Path) -> None:
    load_otis_checkpoint("otis_tiny", str(path))


def _load_echoingecg(path: Path) -> None:
    load_echoingecg_checkpoint("echoingecg_tiny", str(path))


def _load_frames(path: Path) -> None:
    load_dinov2_checkpoint(create_frame_encoder("dinov2_tiny"), str(path))


def _build_otis_from_config(path: Path) -> None:
    build_ecg_encoder(cfg_with(model__ecg="otis_tiny", model__ecg_checkpoint=str(path)))


LOADERS = {
    "otis": (_load_otis, "OTIS checkpoint"),
    "echoingecg": (_load_echoingecg, "EchoingECG checkpoint"),
    "frame_encoder": (_load_frames, "frame encoder checkpoint"),
    "otis_via_config": (_build_otis_from_config, "OTIS checkpoint"),
}


@pytest.mark.parametrize("fmt", ["zip", "pickle"])
@pytest.mark.parametrize("kind", list(PAYLOADS))
@pytest.mark.parametrize("loader", list(LOADERS))
def test_malicious_checkpoint_is_refused_and_runs_nothing(tmp_path, loader, kind, fmt):
    marker = tmp_path / f"pwned-{uuid.uuid4().hex}"
    path = write_payload(tmp_path / "weights.pth", kind, marker, fmt)
    load, what = LOADERS[loader]
    with pytest.raises(CheckpointError) as info:
        load(path)
    msg = str(info.value)
    assert not marker.exists(), "the payload ran"
    assert "\n" not in msg and msg.startswith(f"{what} {path}")
    assert re.search(REFUSED[kind], msg), msg
    assert "nothing in the file was executed" in msg


def test_unreadable_checkpoint_says_so(tmp_path):
    path = tmp_path / "junk.pth"
    path.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="not a readable weights-only torch file"):
        safe_torch_load(path, "OTIS checkpoint")
    with pytest.raises(FileNotFoundError):
        safe_torch_load(tmp_path / "absent.pth", "OTIS checkpoint")


# ---------------------------------------------------------------------------------------------------
# OTIS: the golden upstream-layout checkpoint and the input contract


def test_golden_otis_checkpoint_needs_exactly_the_allow_list(golden):
    path = golden / "otis_base" / "otis_base.pth"
    with pytest.raises(pickle.UnpicklingError, match="argparse.Namespace"):
        torch.load(path, map_location="cpu", weights_only=True)  # why the allow-list holds Namespace
    assert SAFE_GLOBALS == [argparse.Namespace]
    ckpt = safe_torch_load(path, "OTIS checkpoint")
    assert set(ckpt) == {"model", "domains", "domain_offsets", "args", "epoch"}
    assert isinstance(ckpt["args"], argparse.Namespace) and ckpt["args"].time_steps == 2400
    assert ckpt["domains"]["ecg"] == torch.Size([1, 12, 2400]) and ckpt["domain_offsets"]["ecg"] == 1


def test_golden_otis_loads_weights_only_and_matches_upstream(golden):
    cfg = cfg_with(
        model__ecg="otis_base", model__ecg_checkpoint=str(golden / "otis_base" / "otis_base.pth")
    )  # 500 Hz x 3 s = 1500 samples, within the 2400 the checkpoint was pretrained on: no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error", ContractWarning)
        enc = build_ecg_encoder(cfg).eval()
    enc.set_attn_impl("mha")
    assert enc.lead_ids.tolist() == list(range(2, 14))  # 1 + ecg offset 1 + lead, as upstream
    x = torch.from_numpy(np.load(golden / "otis_base" / "input.npy"))  # (2, 12, 1500)
    expected = np.load(golden / "otis_base" / "expected.npz")
    with torch.no_grad():
        cls = enc.double()(x.double())
    np.testing.assert_allclose(cls.numpy(), expected["cls"], atol=1e-9, rtol=0)


def test_golden_otis_longer_window_warns_with_the_numbers(golden):
    cfg = cfg_with(
        model__ecg="otis_base",
        model__ecg_checkpoint=str(golden / "otis_base" / "otis_base.pth"),
        data__window_s=10.0,
    )
    with pytest.warns(ContractWarning) as record:
        enc = build_ecg_encoder(cfg)
    msg = str(record[0].message)
    assert (
        "2400-sample ecg" in msg and "5000 samples (10 s at 500 Hz)" in msg and "data.window_s <= 4.8" in msg
    )
    assert "interpolated from 100 to 208 patches" in msg
    assert enc.pos_embed_x.shape[1] == 1 + 5000 // 24  # interpolated, as upstream fine-tuning does


def test_golden_otis_window_shorter_than_a_patch_is_refused(golden):
    with pytest.raises(
        CheckpointError, match=r"10 samples is shorter than one 24-sample patch.*data\.window_s"
    ):
        load_otis_checkpoint("otis_base", str(golden / "otis_base" / "otis_base.pth"), n_samples=10)


@pytest.mark.parametrize(
    ("domains", "args", "match"),
    [
        ({"ecg": torch.Size([1, 8, 2500])}, {}, r"ecg domain has 8 variates, the encoder feeds 12 leads"),
        ({"ecg": torch.Size([1, 15, 2500])}, {}, r"15 variates"),
        ({"ecg": torch.Size([2, 12, 2500])}, {}, r"ecg domain has 2 input channels, the encoder takes 1"),
        ({}, {"input_variates": 6, "time_steps": 2500}, r"6 variates"),  # args when domains is absent
        ({"ecg": torch.Size([1, 12, 2500])}, {"patch_size": (1, 32)}, r"args\.patch_size \(1, 32\)"),
    ],
)
def test_otis_contract_mismatch_names_what_differs(tmp_path, domains, args, match):
    path = tmp_path / "otis.pth"
    torch.save(
        {
            "model": otis_public_state(),
            "domains": domains,
            "domain_offsets": {"ecg": 0, "eeg": 15},
            "args": argparse.Namespace(model="otis_tinyDeep", **args),
        },
        path,
    )
    with pytest.raises(CheckpointError, match=match) as info:
        load_otis_checkpoint("otis_tiny", str(path))
    assert str(info.value).startswith(f"OTIS checkpoint {path} does not fit the input contract")


def test_otis_contract_accepts_what_upstream_accepts(tmp_path):
    path = tmp_path / "otis.pth"
    save_otis(path, otis_public_state(n_time=40))  # ecg (1, 12, 2500), args without time_steps
    with warnings.catch_warnings():
        warnings.simplefilter("error", ContractWarning)
        load_otis_checkpoint("otis_tiny", str(path), n_samples=1500)  # shorter than pretraining: fine
        load_otis_checkpoint("otis_tiny", str(path), fs=250, n_samples=750)  # OTIS records no rate


def test_echoingecg_lead_count_is_checked(tmp_path):
    sd = echoingecg_public_state()
    sd["ecg_encoder.conv1.weight"] = sd["ecg_encoder.conv1.weight"][:, :8]
    path = tmp_path / "echoingecg.pt"
    torch.save(sd, path)
    with pytest.raises(CheckpointError, match="its stem takes 8 leads, the encoder feeds 12"):
        load_echoingecg_checkpoint("echoingecg", str(path))


# ---------------------------------------------------------------------------------------------------
# the EchoingECG scaler


def fitted_scaler(seed: int = 0, n: int = 12):
    sklearn = pytest.importorskip("sklearn.preprocessing")
    rng = np.random.default_rng(seed)
    return sklearn.StandardScaler().fit(
        rng.normal(rng.normal(0, 0.01, n), rng.uniform(0.05, 0.4, n), (500, n))
    )


def convert(src: Path, out: Path, *extra: str) -> int:
    return stence_main(["scaler", "convert", str(src), "--out", str(out), *extra])


@pytest.mark.parametrize("how", ["pickle2", "pickle4", "pickle5", "joblib", "joblib_zlib", "joblib_xz"])
def test_scaler_convert_reads_a_real_standard_scaler(tmp_path, how):
    scaler = fitted_scaler()
    src = tmp_path / "ecg_scaler.pkl"
    if how.startswith("pickle"):
        src.write_bytes(pickle.dumps(scaler, protocol=int(how[-1])))
    else:
        joblib = pytest.importorskip("joblib")
        joblib.dump(scaler, src, compress={"joblib": 0, "joblib_zlib": 3, "joblib_xz": ("xz", 3)}[how])
    out = tmp_path / "scaler.json"
    assert convert(src, out) == 0
    mean, scale = load_scaler(out)
    np.testing.assert_array_equal(mean, scaler.mean_)  # exact: JSON floats round-trip float64
    np.testing.assert_array_equal(scale, scaler.scale_)
    doc = json.loads(out.read_text())
    assert doc["n_features_in_"] == 12 and doc["n_samples_seen_"] == 500 and "lead_order" not in doc
    np.testing.assert_array_equal(doc["var_"], scaler.var_)
    assert convert(src, out) == 2  # an existing output is replaced only with --overwrite
    assert convert(src, out, "--overwrite", "--lead-order", "mimic") == 0
    assert json.loads(out.read_text())["lead_order"] == list(MIMIC_LEADS)
    with pytest.raises(CheckpointError, match="lead order"):
        load_scaler(out, leads=("I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6"))


def test_scaler_converter_keeps_feature_names(tmp_path):
    pd = pytest.importorskip("pandas")
    sklearn = pytest.importorskip("sklearn.preprocessing")
    names = ["I", "II", "III"]
    scaler = sklearn.StandardScaler().fit(
        pd.DataFrame(np.random.default_rng(1).normal(size=(50, 3)), columns=names)
    )
    src = tmp_path / "s.pkl"
    src.write_bytes(pickle.dumps(scaler))
    attrs = read_scaler_pickle(src)
    assert attrs["feature_names_in_"] == names
    np.testing.assert_array_equal(attrs["mean_"], scaler.mean_)


@pytest.mark.parametrize("kind", [*PAYLOADS, "inside_scaler_state"])
@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_scaler_convert_refuses_malicious_pickles(tmp_path, capsys, kind, protocol):
    marker = tmp_path / f"pwned-{uuid.uuid4().hex}"
    if kind == "inside_scaler_state":  # a real StandardScaler whose state carries the payload
        scaler = fitted_scaler()
        scaler.mean_ = RunsShell(marker)
        blob, refused = pickle.dumps(scaler, protocol=protocol), "posix.system"
    else:
        obj, refused = PAYLOADS[kind](marker), REFUSED[kind].replace("\\", "")
        blob = pickle.dumps(obj, protocol=protocol)
    src, out = tmp_path / "ecg_scaler.pkl", tmp_path / "scaler.json"
    src.write_bytes(blob)
    assert convert(src, out) == 1
    err = capsys.readouterr().err
    assert f"refused global {refused}" in err and "nothing in the file was executed" in err, err
    assert not marker.exists(), "the payload ran"
    assert not out.exists() and not list(tmp_path.glob("*.tmp.json"))


def test_scaler_reader_refuses_other_objects(tmp_path):
    src = tmp_path / "s.pkl"
    src.write_bytes(pickle.dumps({"mean_": np.zeros(12)}))
    with pytest.raises(CheckpointError, match="holds a dict, not a StandardScaler"):
        read_scaler_pickle(src)
    src.write_bytes(pickle.dumps(np.zeros(3))[:-5])
    with pytest.raises(CheckpointError, match="not a readable StandardScaler pickle"):
        read_scaler_pickle(src)


def test_golden_scaler_json_loads_and_reaches_the_encoder(golden, tmp_path):
    path = golden / "echoingecg" / "scaler.json"
    doc = json.loads(path.read_text())
    mean, scale = load_scaler(path, leads=doc["lead_order"])
    np.testing.assert_array_equal(mean, doc["mean_"])
    np.testing.assert_array_equal(scale, doc["scale_"])
    expected = np.load(golden / "echoingecg" / "expected.npz")
    np.testing.assert_array_equal(mean.astype(np.float32), expected["center"])  # as upstream builds them
    np.testing.assert_array_equal(scale.astype(np.float32), expected["scale"])
    with pytest.raises(CheckpointError, match="lead order"):
        load_scaler(path, leads=MIMIC_LEADS)
    # model.ecg_scaler reaches the encoder's input contract: upstream's downsampled input, scaled by the
    # contract, is upstream's encoder input, and gives upstream's embedding
    cfg = cfg_with(
        model__ecg="echoingecg",
        model__ecg_checkpoint=str(golden / "echoingecg" / "ecg_encoder.pt"),
        model__ecg_scaler=str(path),
    )
    enc = build_ecg_encoder(cfg).eval()
    assert enc.contract.kind == "echoingecg" and enc.contract.fs == 100 and enc.contract.n_samples == 1000
    np.testing.assert_array_equal(np.float32(enc.contract.scaler_mean), expected["center"])
    x = np.stack([window_part(d, enc.contract) for d in expected["downsampled"]])  # (2, 12, 1000)
    np.testing.assert_allclose(x, expected["preprocessed"], rtol=0, atol=1e-6)
    with torch.no_grad():
        emb = enc(torch.from_numpy(x))
    torch.testing.assert_close(emb, torch.from_numpy(expected["embedding"]), rtol=0, atol=1e-6)


def test_ecg_scaler_config_key_reaches_echoingecg_only(tmp_path):
    path = tmp_path / "scaler.json"
    path.write_text(json.dumps({"mean": [0.25 * i for i in range(12)], "scale": [2.0] * 12}))
    enc = build_ecg_encoder(cfg_with(model__ecg="echoingecg_tiny", model__ecg_scaler=str(path)))
    assert list(enc.contract.scaler_mean) == [0.25 * i for i in range(12)]
    assert list(enc.contract.scaler_scale) == [2.0] * 12
    x = window_part(np.ones((12, 2000), np.float32), enc.contract)
    assert x.shape == (12, enc.contract.n_samples) and np.isfinite(x).all()
    assert not build_ecg_encoder(cfg_with(model__ecg="echoingecg_tiny")).contract.has_scaler
    # the scaler is given in the weights' lead order and stored in the input's order
    mimic = build_ecg_encoder(cfg_with(model__ecg="echoingecg_tiny", model__ecg_scaler=str(path),
                                       model__lead_order="mimic"))
    assert mimic.contract.scaler_mean[4] == 0.25 * 5 and mimic.contract.scaler_mean[5] == 0.25 * 4
    with pytest.raises(ValueError, match="model.ecg_scaler is for EchoingECG encoders"):
        build_ecg_encoder(cfg_with(model__ecg="otis_tiny", model__ecg_scaler=str(path)))


@pytest.mark.parametrize(
    ("doc", "match"),
    [
        ({"mean_": [0.0] * 12, "scale_": [1.0] * 11 + [0.0]}, r"scale must be > 0, not at leads \[11\]"),
        ({"mean_": [0.0] * 12, "scale_": [1.0] * 11 + [-2.0]}, r"scale must be > 0"),
        (
            {"mean_": [0.0] * 5 + [float("nan")] + [0.0] * 6, "scale_": [1.0] * 12},
            r"non-finite values at \[5\]",
        ),
        ({"mean_": [0.0] * 12, "scale_": [1.0] * 11 + [float("inf")]}, r"scale_ has non-finite"),
        ({"mean_": [0.0] * 11, "scale_": [1.0] * 11}, r"shape \(11,\), the encoder expects \(12,\)"),
        ({"mean_": [[0.0] * 12], "scale_": [1.0] * 12}, r"shape \(1, 12\)"),
        ({"mean_": [0.0] * 12}, r"no scale_ or scale"),
        ({"mean_": ["a"] * 12, "scale_": [1.0] * 12}, r"not a list of numbers"),
        ({"mean_": [0.0] * 12, "scale_": [1.0] * 12, "n_features_in_": 8}, r"n_features_in_ 8 != 12"),
    ],
)
def test_invalid_scaler_is_refused(tmp_path, doc, match):
    path = tmp_path / "scaler.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(CheckpointError, match=match):
        load_scaler(path)


def test_scaler_npz_and_pickles_in_load_scaler(tmp_path):
    good = tmp_path / "scaler.npz"
    np.savez(good, mean=np.arange(12.0), scale=np.full(12, 0.5))
    mean, scale = load_scaler(good)
    assert mean.tolist() == list(range(12)) and scale.tolist() == [0.5] * 12
    bad = tmp_path / "objects.npz"
    np.savez(bad, mean_=np.array([object()] * 12, dtype=object), scale_=np.ones(12))
    with pytest.raises(CheckpointError, match="unreadable"):
        load_scaler(bad)
    marker = tmp_path / f"pwned-{uuid.uuid4().hex}"
    pkl = write_payload(tmp_path / "ecg_scaler.pkl", "os.system", marker, "pickle")
    with pytest.raises(CheckpointError, match="stence scaler convert"):
        load_scaler(pkl)
    assert not marker.exists()


def test_scaler_reader_imports_neither_sklearn_nor_joblib(tmp_path):
    joblib = pytest.importorskip("joblib")
    src = tmp_path / "ecg_scaler.pkl"
    joblib.dump(fitted_scaler(), src)
    code = (
        "import sys; from stence.models.safe_load import read_scaler_pickle; "
        f"a = read_scaler_pickle({str(src)!r}); assert a['mean_'].shape == (12,); "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('sklearn', 'joblib')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
