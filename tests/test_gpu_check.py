"""bench/gpu_check.py (with bench/gpu_math.py and bench/gpu_parts.py): the peak table, the FLOP and MFU arithmetic on modules whose FLOPs are known by hand, the
refusal without a GPU, the data and feature parts without Ray, and (ray, slow) the whole --cpu-smoke run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bench import gpu_check as gc
from bench import gpu_math as gm
from bench import gpu_parts as gp
from stence.config import to_dict

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(("name", "peak", "label"), [
    ("NVIDIA H100 80GB HBM3", 989.0, "H100 SXM"),
    ("NVIDIA H100 PCIe", 756.0, "H100 PCIe"),
    ("NVIDIA H100 NVL", 835.0, "H100 NVL"),
    ("NVIDIA H200", 989.0, "H200 SXM"),
    ("NVIDIA A100-SXM4-80GB", 312.0, "A100"),
    ("NVIDIA A100-PCIE-40GB", 312.0, "A100"),
    ("NVIDIA L4", 121.0, "L4"),
    ("NVIDIA A10", 125.0, "A10"),
    ("NVIDIA A10G", None, "unknown"),  # not an A10: another chip, another peak
    ("Tesla T4", None, "unknown"),
])
def test_peak_table(name: str, peak: float | None, label: str) -> None:
    assert gm.peak_bf16_tflops(name) == (peak, label)


def test_linear_flops_forward_and_backward(one_thread) -> None:
    B, n_in, n_out = 8, 64, 32
    lin = nn.Linear(n_in, n_out, bias=False)
    x = torch.randn(B, n_in)
    fwd = 2 * B * n_in * n_out  # one multiply-add = 2 FLOPs
    assert gm.count_flops(lambda: lin(x)) == fwd
    # backward: weight gradient only (x needs none), then also the input gradient
    assert gm.count_flops(lambda: lin(x).sum().backward()) == 2 * fwd
    x.requires_grad_(True)
    assert gm.count_flops(lambda: lin(x).sum().backward()) == 3 * fwd


def test_attention_is_counted_on_cpu(one_thread) -> None:
    """The CPU flash kernel is invisible to FlopCounterMode; count_flops forces the math backend."""
    B, H, N, d = 2, 3, 16, 8
    q, k, v = (torch.randn(B, H, N, d) for _ in range(3))
    assert gm.count_flops(lambda: F.scaled_dot_product_attention(q, k, v)) == 2 * (2 * B * H * N * N * d)


def test_throughput_arithmetic() -> None:
    fig = gm.throughput_figures(flops_per_sample=50e9, samples_per_s=2000.0, peak_tflops=989.0)
    assert fig["achieved_tflops"] == pytest.approx(100.0)  # 50e9 * 2000 / 1e12
    assert fig["mfu"] == pytest.approx(100.0 / 989.0)
    assert gm.throughput_figures(1e9, 10.0, None) == {"achieved_tflops": pytest.approx(0.01), "mfu": None}
    assert gm.cores_needed(3000.0, 250.0) == pytest.approx(12.0)
    assert gm.cores_needed(None, 250.0) is None and gm.cores_needed(3000.0, 0.0) is None


def test_refuses_without_a_gpu(tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, "-m", "bench.gpu_check", "--out", str(out)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpu_check: no CUDA GPU visible") and "--cpu-smoke" in lines[0]
    assert not out.exists()


def test_refusal_in_process(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gc.main(["--out", str(tmp_path / "r.json")]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    assert gc.refusal(gc.parse_args(["--cpu-smoke"])) is None


def test_arguments_and_configs(tmp_path: Path) -> None:
    gpu = gc.parse_args([])
    assert (gpu.encoder, gpu.batch, gpu.views, gpu.minutes, gpu.cpu_smoke) == ("otis_base", 128, 4, 6.0, False)
    smoke = gc.parse_args(["--cpu-smoke"])
    assert (smoke.encoder, smoke.batch, smoke.loader_workers) == ("otis_tiny", 8, 1)
    with pytest.raises(SystemExit):
        gc.parse_args(["--parts", "pretrain,nope"])
    cfg = gp.check_config(gpu, str(tmp_path))  # configs/paper.yaml, no weight files, one GPU worker
    assert (cfg.model.ecg, cfg.train.workers, cfg.train.gpus, cfg.train.max_failures) == ("otis_base", 1, 1, 0)
    assert cfg.feature.frame_checkpoint == "" and cfg.model.ecg_checkpoint == "" and not cfg.tracking.enabled
    assert (cfg.feature.frame_encoder, cfg.feature.feature_dim, cfg.optim.batch_size) == ("dinov2_vits14", 512, 128)
    scfg = gp.check_config(smoke, str(tmp_path))
    assert (scfg.model.ecg, scfg.train.gpus, scfg.train.workers) == ("otis_tiny", 0, 1)


def test_pretrain_step_flops_scale_with_the_batch(one_thread) -> None:
    """FLOPs of one real `pretrain_step` on the synthetic batch: the model's work is per sample (the per-step
    weight composition of the fused attention and the B x B CLIP logits are a sliver of it)."""
    from stence.losses import StenceLoss
    from stence.models.registry import build_stence_model
    from stence.train.pretrain_loop import pretrain_step, tower_optimizers
    from stence.train.worker import WorkerInfo

    cfg = gp.check_config(gc.parse_args(["--cpu-smoke"]), "/tmp/unused")
    info = WorkerInfo(0, 1, 0, torch.device("cpu"))
    torch.manual_seed(0)
    model = build_stence_model(cfg).train()
    opts = [o for _, o in tower_optimizers(model, cfg)]
    loss_fn = StenceLoss(cfg.loss.w_sten, gather=False)
    counts = {}
    for B in (2, 4):
        batch = gp.synthetic_batch(cfg, B, views=2, patches=gp.frame_patches(cfg), device="cpu")
        assert batch["ecg"].shape == (B, 12, 1500) and batch["angio_feats"].shape == (B, 2, 64, 64)
        counts[B] = gm.count_flops(lambda b=batch: pretrain_step(model, loss_fn, b, opts, None, info))
    assert counts[2] > 0
    assert counts[4] / counts[2] == pytest.approx(2.0, rel=0.02)


@pytest.fixture(scope="module")
def small_cohort(tmp_path_factory) -> Path:
    """8 synthetic patients ingested in-process with the smoke config (a few seconds)."""
    cfg = gp.check_config(gc.parse_args(["--cpu-smoke"]), "/tmp/unused")
    return gp.make_cohort(cfg, tmp_path_factory.mktemp("gpu-check"), patients=8, views=2, processes=1)


def test_data_path_and_feature_probe_without_ray(small_cohort: Path, tmp_path: Path, one_thread) -> None:
    cfg = gp.check_config(gc.parse_args(["--cpu-smoke"]), str(tmp_path / "ray"))
    store = gp.write_feature_store(small_cohort, tmp_path / "features", cfg.feature.variants, 64, 64)
    assert not (small_cohort / "features").exists()  # the cohort is only read
    d = gp.run_data_path(cfg, small_cohort, store, workers=0, batch=4, seconds=0.2, warmup_batches=1,
                         min_batches=2)
    assert d["samples"] >= 8 and d["samples_per_s_per_core"] == pytest.approx(d["samples_per_s"])
    assert d["angio_feats_mb_per_sample"] == pytest.approx(2 * 64 * 64 * 4 / 1e6)  # (V, P, F) float32
    probe = gp.FeatureProbe(str(small_cohort), to_dict(cfg))
    assert probe.device_name() == "cpu"
    a = probe.actor_path(batch_size=4, seconds=0.1, warmup=1, min_batches=2)
    assert a["frames"] >= 8 and a["augmented_share"] == pytest.approx(0.5)  # variants 0 and 1
    e = probe.encoder_only(batch_size=2, seconds=0.1, warmup=1, min_batches=2)
    assert e["frames_per_s"] > 0 and e["flops_per_frame"] > 0


def test_table_lists_every_part() -> None:
    r = {
        "device": {"name": "NVIDIA H100 80GB HBM3", "capability": "sm_90", "torch": "2.x", "cuda": "13.0",
                   "nccl": "2.27.3", "ray": "2.60.0"},
        "peak": {"tflops": 989.0, "source": "H100 SXM"},
        "setup": {"encoder": "otis_base"},
        "pretrain": {"samples_per_s": 2000.0, "batch": 128, "precision": "bf16", "backend": "nccl",
                     "world_size": 1, "flops_per_sample": 75e9, "achieved_tflops": 150.0, "mfu": 150 / 989,
                     "h2d_gb_per_s": 10.0, "h2d_samples_per_s_ceiling": 900.0, "peak_mem_gib": 30.0,
                     "params": 40e6},
        "features": {"error": "RuntimeError: boom"},
        "data": {"samples_per_s_per_core": 250.0, "loader_workers": 4, "batch": 16,
                 "angio_feats_mb_per_sample": 11.2},
        "feed": {"cores_needed": 8.0, "cores_available": 16},
    }
    table = gc.format_table(r)
    assert "nccl x1" in table and "15.2 %" in table and "FAILED" in table and "8.0" in table


@pytest.mark.ray
@pytest.mark.slow
def test_cpu_smoke_end_to_end(ray_session: None, small_cohort: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "gpu_check.json"
    assert gc.main(["--cpu-smoke", "--cohort", str(small_cohort), "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    p, f, d = r["pretrain"], r["features"], r["data"]
    assert (r["mode"], p["backend"], p["world_size"], p["device"], p["precision"]) == ("cpu-smoke", "gloo", 1,
                                                                                       "cpu", "fp32")
    assert p["samples_per_s"] > 0 and p["flops_per_sample"] > 0 and p["mfu"] is None and p["loss_finite"]
    assert p["steps"] >= 2 and p["batch"] == 8
    assert f["device"] == "cpu" and f["actor_path"]["frames_per_s"] > 0
    assert [e["batch"] for e in f["encoder_only"]] == [16, 64]
    assert d["samples_per_s_per_core"] > 0 and d["loader_workers"] == 1
    assert r["feed"]["cores_needed"] == pytest.approx(p["samples_per_s"] / d["samples_per_s_per_core"])
    printed = capsys.readouterr().out
    assert "gloo x1" in printed and "MFU" in printed and "n/a" in printed
