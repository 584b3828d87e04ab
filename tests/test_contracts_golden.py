"""Each backbone's input contract against the upstream code's own numbers (../shared/golden, random weights).

Everything runs through the code users run: `stence embed` on the PTB-XL records the fixtures were made from
(raw 500 Hz WFDB -> reader -> contract -> encoder), and the contract function on the fixtures' raw arrays.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from stence.cli import main
from stence.config import Config, apply_overrides
from stence.data.contract import echoingecg_contract, otis_contract, paper_contract
from stence.data.contract_apply import apply_contract, record_part, window_part
from stence.models.registry import build_ecg_encoder

REPO = Path(__file__).resolve().parents[1]
GOLDEN = REPO.parent / "shared" / "golden"
WFDB = REPO.parent / "shared" / "data" / "ecg" / "wfdb"
RECORDS = ("HR06000", "HR06001")  # batch rows 0 and 1 of every fixture


@pytest.fixture(scope="module")
def golden() -> Path:
    if not (GOLDEN.is_dir() and WFDB.is_dir()):
        pytest.skip(f"golden fixtures or records not found under {GOLDEN.parent} (a fresh clone has no ../shared)")
    return GOLDEN


def _embed(tmp_path: Path, *overrides: str) -> dict[str, np.ndarray]:
    out = tmp_path / "emb.npz"
    records = [str(WFDB / f"{r}.hea") for r in RECORDS]
    assert main(["embed", "--out", str(out), "--set", *overrides, "--", *records]) == 0
    with np.load(out, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def test_otis_contract_reproduces_upstream_preprocessing(golden):
    raw = np.load(golden / "otis_preprocess" / "input_raw.npy")  # (2, 12, 5000) mV, 500 Hz
    exp = np.load(golden / "otis_preprocess" / "expected.npz")
    c = otis_contract(500, 3.0)
    for i in range(2):
        normalised = record_part(raw[i], 500, c)  # the whole 10 s record, then the first 1500 samples
        np.testing.assert_allclose(normalised, exp["normalised"][i], rtol=0, atol=1e-5)
        np.testing.assert_allclose(window_part(normalised, c), exp["crop"][i], rtol=0, atol=1e-5)
    # the order matters (normalise the stored record, then crop): cropping first is measurably different
    assert np.abs(apply_contract(raw[0][:, :1500], 500, c) - exp["crop"][0]).max() > 0.1


def test_echoingecg_contract_reproduces_upstream_preprocessing(golden):
    raw = np.load(golden / "echoingecg" / "input_raw.npy")
    exp = np.load(golden / "echoingecg" / "expected.npz")
    doc = json.loads((golden / "echoingecg" / "scaler.json").read_text())
    c = echoingecg_contract(scaler=(doc["mean_"], doc["scale_"]))
    for i in range(2):
        np.testing.assert_allclose(apply_contract(raw[i], 500, c), exp["preprocessed"][i], rtol=0, atol=1e-4)
    # the paper's contract is a different input (known mismatch; the paper fine-tunes through it)
    assert np.abs(apply_contract(raw[0], 500, paper_contract())[:, :1000] - exp["preprocessed"][0]).max() > 0.5


def test_otis_base_cls_from_fixture_float32_and_float64(golden):
    cfg = apply_overrides(Config(), {"model.ecg": "otis_base", "model.lead_order": "standard",
                                     "model.ecg_checkpoint": str(golden / "otis_base" / "otis_base.pth")})
    enc = build_ecg_encoder(cfg).eval()
    assert enc.contract.kind == "otis" and enc.contract.n_samples == 1500
    x = torch.from_numpy(np.load(golden / "otis_base" / "input.npy"))  # (2, 12, 1500) raw mV
    exp = np.load(golden / "otis_base" / "expected.npz")
    with torch.no_grad():
        torch.testing.assert_close(enc(x), torch.from_numpy(exp["cls"]).float(), rtol=0, atol=1e-5)
        torch.testing.assert_close(enc.double()(x.double()), torch.from_numpy(exp["cls"]), rtol=0, atol=1e-10)


def test_stence_embed_gives_the_upstream_otis_embedding(golden, tmp_path):
    z = _embed(tmp_path, "model.ecg=otis_base", f"model.ecg_checkpoint={golden / 'otis_base' / 'otis_base.pth'}")
    exp = np.load(golden / "otis_base" / "expected.npz")
    assert z["embeddings"].dtype == np.float32 and z["embeddings"].shape == (2, 192)
    assert [Path(r).stem for r in z["records"]] == list(RECORDS)
    assert json.loads(str(z["contract"]))["kind"] == "otis"
    np.testing.assert_allclose(z["embeddings"], exp["cls_on_preprocessed"], rtol=0, atol=1e-5)


def test_stence_embed_gives_the_upstream_echoingecg_embedding(golden, tmp_path):
    z = _embed(tmp_path, "model.ecg=echoingecg", f"model.ecg_checkpoint={golden / 'echoingecg' / 'ecg_encoder.pt'}",
               f"model.ecg_scaler={golden / 'echoingecg' / 'scaler.json'}")
    exp = np.load(golden / "echoingecg" / "expected.npz")
    assert z["embeddings"].shape == (2, 512) and json.loads(str(z["contract"]))["kind"] == "echoingecg"
    np.testing.assert_allclose(z["embeddings"], exp["embedding"], rtol=0, atol=1e-5)


def test_paper_contract_is_selectable_and_differs(golden, tmp_path):
    """model.contract=paper feeds the pretrained backbone what the StenCE code feeds it (not upstream's)."""
    z = _embed(tmp_path, "model.ecg=echoingecg", "model.contract=paper",
               f"model.ecg_checkpoint={golden / 'echoingecg' / 'ecg_encoder.pt'}")
    exp = np.load(golden / "echoingecg" / "expected.npz")
    assert json.loads(str(z["contract"]))["kind"] == "paper"
    cos = (z["embeddings"] * exp["embedding"]).sum(1) / np.linalg.norm(z["embeddings"], axis=1)
    assert (cos < 0.99).all()  # a different input, a different embedding


def test_embed_refuses_to_overwrite_and_reports_bad_records(golden, tmp_path, capsys):
    out = tmp_path / "e.npz"
    out.write_bytes(b"mine")
    args = ["embed", "--out", str(out), "--", str(WFDB / "HR06000.hea")]
    assert main(args) == 1 and out.read_bytes() == b"mine"
    bad = tmp_path / "broken.hea"
    bad.write_text("this is not a header\n")
    assert main(["embed", "--overwrite", "--out", str(out), "--", str(WFDB / "HR06000.hea"), str(bad)]) == 1
    with np.load(out, allow_pickle=False) as z:
        assert z["embeddings"].shape[0] == 1 and list(z["failed_records"]) == [str(bad)]
    assert "ERROR" in capsys.readouterr().out
