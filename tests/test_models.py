"""Model properties, looped over the registries so a newly registered variant is tested for free."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from scipy import signal as sps

from stence.config import Config, apply_overrides
from stence.models.base import ECGEncoder, count_parameters
from stence.models.echoingecg import PolyphaseResample, echoingecg_native
from stence.models.frame_encoder import IMAGENET_MEAN, IMAGENET_STD, prepare_frames
from stence.models.heads import ClassifierHead, DownstreamModel, ProjectionHead
from stence.models.registry import (
    build_downstream_model,
    build_frame_encoder,
    build_stence_model,
    create_aggregator,
    create_ecg_encoder,
    create_frame_encoder,
    list_ecg_encoders,
    list_frame_encoders,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # small models: no OpenMP spinning (conftest)


# Registered presets are shrunk (same widths/heads, fewer blocks) so every name runs in seconds.
SHRINK = {
    "otis_": {"depth": 1},
    "echoingecg": {"layers": (1, 1, 1, 1)},
    "dinov2_": {"depth": 1},
}


def small(name: str) -> dict:
    if name.endswith("_tiny"):
        return {}
    for prefix, kw in SHRINK.items():
        if name.startswith(prefix):
            return dict(kw)
    return {}


def ecg_batch(enc: ECGEncoder, B: int = 2, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, len(enc.input_spec["leads"]), enc.input_spec["n_samples"], generator=g)


def assert_all_grads(module: torch.nn.Module) -> None:
    missing = [
        n for n, p in module.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())
    ]
    assert not missing, f"parameters without gradient: {missing}"


def test_unknown_names_list_the_valid_ones():
    with pytest.raises(ValueError, match="otis_tiny"):
        create_ecg_encoder("otis_gigantic")
    with pytest.raises(ValueError, match="dinov2_tiny"):
        create_frame_encoder("resnet50")
    assert {"otis_tiny", "otis_base", "otis_large", "otis_huge", "echoingecg", "echoingecg_tiny"} <= set(
        list_ecg_encoders()
    )


@pytest.mark.parametrize("name", list_ecg_encoders())
def test_ecg_encoder_contract(name):
    torch.manual_seed(0)
    enc = create_ecg_encoder(name, **small(name))
    spec = enc.input_spec
    assert set(spec) == {"fs", "n_samples", "leads", "lead_order", "contract"} and len(spec["leads"]) == 12
    assert (spec["contract"]["fs"], spec["contract"]["n_samples"]) == (spec["fs"], spec["n_samples"])
    assert enc.arch["name"] == name
    x = ecg_batch(enc, B=3)
    enc.train()
    tokens = enc.forward_features(x)
    assert tokens.ndim == 3 and tokens.shape[0] == 3
    out = enc(x)
    assert out.shape == (3, enc.embed_dim) and out.dtype == torch.float32
    assert torch.isfinite(out).all() and torch.isfinite(tokens).all()
    (out * torch.randn_like(out)).sum().backward()  # a random direction: L2-normalised outputs have |out| = 1
    assert_all_grads(enc)
    enc.eval()
    with torch.no_grad():
        torch.testing.assert_close(enc.embed(x), enc(x))
    nwd = enc.no_weight_decay()
    names = dict(enc.named_parameters())
    assert nwd <= set(names)
    assert all(names[n].ndim <= 1 or "embed" in n or "token" in n for n in nwd)
    assert any(n.endswith("bias") for n in nwd) and not any(n.endswith("conv1.weight") for n in nwd)


@pytest.mark.parametrize("name", list_ecg_encoders())
def test_frozen_encoder_is_unchanged_by_an_optimiser_step(name):
    torch.manual_seed(0)
    enc = create_ecg_encoder(name, **small(name))
    model = DownstreamModel(enc, ClassifierHead(enc.embed_dim, 1), freeze_encoder=True)
    before = copy.deepcopy(enc.state_dict())  # parameters and BatchNorm statistics
    head_before = copy.deepcopy(model.head.state_dict())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    model.train()
    assert not enc.training
    loss = model(ecg_batch(enc, B=4)).pow(2).mean()
    loss.backward()
    opt.step()
    for k, v in enc.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0, msg=k)
    assert not torch.equal(model.head.fc.weight, head_before["fc.weight"])
    assert count_parameters(enc, trainable_only=True) == 0


def test_otis_base_has_7_1_million_parameters():
    n = count_parameters(create_ecg_encoder("otis_base"))
    assert abs(n - 7.1e6) / 7.1e6 < 0.03, n


def test_otis_grid_is_lead_major_and_attention_impls_agree():
    torch.manual_seed(0)
    enc = create_ecg_encoder("otis_tiny", drop_path=0.0).eval()
    x = ecg_batch(enc)
    assert enc.forward_features(x).shape == (2, 1 + 12 * (1500 // 24), 64)
    ref = None
    for impl in ("mha", "sdpa", "fused"):
        enc.set_attn_impl(impl)
        with torch.no_grad():
            out = enc(x)
        ref = out if ref is None else ref
        torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)
    # a shorter input uses the first rows of the time table; a longer one than the table is refused
    with torch.no_grad():
        assert enc(x[..., :480]).shape == (2, 64)
    with pytest.raises(ValueError, match="time table"):
        enc(torch.randn(1, 12, 1600))


def test_mimic_lead_order_swaps_avl_and_avf():
    torch.manual_seed(0)
    std = create_ecg_encoder("otis_tiny", drop_path=0.0).eval()
    mimic = create_ecg_encoder("otis_tiny", drop_path=0.0, lead_order="mimic").eval()
    mimic.load_state_dict(std.state_dict())
    x = ecg_batch(std)
    swapped = x[:, [0, 1, 2, 3, 5, 4, 6, 7, 8, 9, 10, 11]]
    with torch.no_grad():
        torch.testing.assert_close(mimic(x), std(swapped))
        assert not torch.allclose(mimic(x), std(x))
    assert mimic.input_spec["lead_order"] == "mimic"
    with pytest.raises(ValueError, match="lead_order"):
        create_ecg_encoder("otis_tiny", lead_order="alphabetical")


def test_echoingecg_resamples_like_scipy_and_output_is_unit_norm():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 12, 1500)).astype(np.float32)
    ours = PolyphaseResample(500, 100)(torch.from_numpy(x)).numpy()
    ref = sps.resample_poly(x.astype(np.float64), 1, 5, axis=-1)
    np.testing.assert_allclose(ours, ref, atol=1e-4)
    ours_up = PolyphaseResample(250, 500)(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(ours_up, sps.resample_poly(x.astype(np.float64), 2, 1, axis=-1), atol=1e-4)
    native = echoingecg_native(x[0], 500, center=np.ones(12), scale=np.full(12, 2.0))
    assert native.shape == (12, 1000)
    np.testing.assert_allclose(native[:, :300], (ref[0] - 1) / 2, atol=1e-5)
    assert (native[:, 300:] == 0.5 * -1).all()  # zero-padded, then scaled
    enc = create_ecg_encoder("echoingecg_tiny", fs=500, n_samples=1500).eval()
    with torch.no_grad():
        out = enc(torch.from_numpy(x[0:2]))
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(2), atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", list_frame_encoders())
def test_frame_encoder_contract(name):
    torch.manual_seed(0)
    kw = small(name)
    enc = create_frame_encoder(name, feature_dim=16, **kw)
    size = enc.img_size if name.endswith("_tiny") else 2 * enc.patch_size
    if size != enc.img_size:
        enc = create_frame_encoder(name, feature_dim=16, img_size=size, **kw)
    frames = torch.rand(3, 40, 50)
    images = prepare_frames(frames, size)
    assert images.shape == (3, 3, size, size)
    out = enc(images)
    assert out.shape == (3, (size // enc.patch_size) ** 2, 16) and torch.isfinite(out).all()
    (out * torch.randn_like(out)).sum().backward()
    assert_all_grads(enc)
    assert "mask_token" in enc.state_dict() and "pos_embed" in enc.state_dict()


def test_prepare_frames_normalises_per_channel():
    x = prepare_frames(torch.full((2, 30, 30), 0.5), 16)
    for c in range(3):
        torch.testing.assert_close(
            x[:, c], torch.full((2, 16, 16), (0.5 - IMAGENET_MEAN[c]) / IMAGENET_STD[c])
        )


def agg_inputs(B=2, V=3, P=5, F=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(B, V, P, F, generator=g)
    mask = torch.ones(B, V, dtype=torch.bool)
    mask[1, 2] = False
    angles = torch.randn(B, V, 2, generator=g) * 40
    return feats, mask, angles


def test_aggregator_shapes_grads_and_angles_matter():
    torch.manual_seed(0)
    agg = create_aggregator(feature_dim=16, d=32, heads=4, ffn=64, layers=2, dropout=0.1)
    feats, mask, angles = agg_inputs()
    out = agg(feats, mask, angles)
    assert out["study_embedding"].shape == (2, 32) and out["stenosis_logits"].shape == (2, 11)
    (out["study_embedding"].sum() + out["stenosis_logits"].sum()).backward()
    assert_all_grads(agg)
    agg.eval()
    with torch.no_grad():
        a = agg(feats, mask, angles)["study_embedding"]
        b = agg(feats, mask, angles + 30)["study_embedding"]
    assert not torch.allclose(a, b)
    with pytest.raises(ValueError, match="real view"):
        agg(feats, torch.zeros(2, 3, dtype=torch.bool), angles)


def test_aggregator_ignores_padded_views():
    torch.manual_seed(0)
    agg = create_aggregator(feature_dim=16, d=32, heads=4, ffn=64, layers=2, dropout=0.1).eval()
    feats, mask, angles = agg_inputs()
    extra = 2  # append padded views full of garbage (including NaN) with random angles
    junk = torch.randn(2, extra, *feats.shape[2:]) * 100
    junk[0, 0, 0, 0] = float("nan")
    feats2 = torch.cat([feats, junk], dim=1)
    mask2 = torch.cat([mask, torch.zeros(2, extra, dtype=torch.bool)], dim=1)
    angles2 = torch.cat([angles, torch.randn(2, extra, 2) * 90], dim=1)
    with torch.no_grad():
        a, b = agg(feats, mask, angles), agg(feats2, mask2, angles2)
        # the already-padded view (study 1, view 2) does not matter either
        feats3 = feats.clone()
        feats3[1, 2] = 1e3
        c = agg(feats3, mask, angles)
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(a[k], c[k], atol=1e-5, rtol=1e-5)


def test_aggregator_frozen_no_cls_uses_the_patient_query():
    torch.manual_seed(0)
    agg = create_aggregator(feature_dim=16, d=32, heads=4, ffn=64, layers=1, frozen_no_cls=True)
    agg.train()
    assert not agg.training and count_parameters(agg, trainable_only=True) == 0
    feats, mask, angles = agg_inputs()
    out = agg(feats, mask, angles)
    x = agg.in_proj(torch.where(mask[:, :, None, None], feats, 0.0))
    # recompute the decoder output to identify which query the embedding comes from
    rad = torch.deg2rad(angles)
    x = x + agg.angle_mlp(torch.cat([rad.sin(), rad.cos()], -1))[:, :, None]
    pad = (~mask)[:, :, None].expand(2, 3, 5).reshape(2, 15)
    dec = agg.decoder(agg.queries.expand(2, -1, -1), x.reshape(2, 15, 32), memory_key_padding_mask=pad)
    torch.testing.assert_close(out["study_embedding"], dec[:, 1])


def test_heads():
    head = ProjectionHead(24, 256)
    assert [type(m).__name__ for m in head] == ["LayerNorm", "Linear", "ReLU", "Linear"]
    assert head(torch.randn(5, 24)).shape == (5, 256)
    clf = ClassifierHead(24, 1)
    assert clf.norm.affine is False and clf(torch.randn(5, 24)).shape == (5, 1)
    multi = ClassifierHead(24, 12, hidden=8)
    assert multi(torch.randn(5, 24)).shape == (5, 12)


def test_finetune_trains_encoder_and_head():
    torch.manual_seed(0)
    enc = create_ecg_encoder("echoingecg_tiny")
    model = DownstreamModel(enc, ClassifierHead(enc.embed_dim, 1), freeze_encoder=False).train()
    assert enc.training
    model(ecg_batch(enc, B=4)).pow(2).mean().backward()
    assert_all_grads(model)


def batch_for(model_cfg: Config, B: int = 3, V: int = 2) -> dict[str, torch.Tensor]:
    n = int(model_cfg.data.window_s * model_cfg.data.fs)
    P = (model_cfg.feature.image_size // 8) ** 2
    g = torch.Generator().manual_seed(1)
    return {
        "ecg": torch.randn(B, 12, n, generator=g),
        "angio_feats": torch.randn(B, V, P, model_cfg.feature.feature_dim, generator=g),
        "view_mask": torch.tensor([[True, True], [True, False], [True, True]])[:B],
        "angles": torch.randn(B, V, 2, generator=g) * 30,
        "targets": torch.randint(0, 2, (B, 11), generator=g).float(),
    }


@pytest.mark.parametrize("ecg", ["otis_tiny", "echoingecg_tiny"])
def test_build_stence_model_from_config(ecg):
    torch.manual_seed(0)
    cfg = apply_overrides(Config(), {"model.ecg": ecg, "loss.learnable_temperature": True})
    model = build_stence_model(cfg)
    batch = batch_for(cfg)
    out = model(batch)
    assert out["ecg_features"].shape == (3, 256) and out["angio_features"].shape == (3, 256)
    assert out["stenosis_logits"].shape == (3, 11) and out["logit_scale"].ndim == 0
    torch.testing.assert_close(out["ecg_features"].norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(out["angio_features"].norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(out["logit_scale"], torch.tensor(1 / 0.2))
    assert isinstance(model.logit_scale, torch.nn.Parameter)
    from stence.losses import StenceLoss

    StenceLoss(0.3)(out, batch)["loss"].backward()
    assert_all_grads(model)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model.encode_ecg(batch["ecg"]), model(batch)["ecg_features"])
    nwd = model.no_weight_decay()
    assert "logit_scale" in nwd and "aggregator.queries" in nwd
    assert "ecg_proj.1.weight" not in nwd and "aggregator.sten_head.bias" in nwd


def test_fixed_temperature_is_a_buffer_and_frozen_no_cls_freezes_the_aggregator():
    cfg = apply_overrides(Config(), {"model.frozen_no_cls": True, "loss.temperature": 0.5})
    model = build_stence_model(cfg)
    assert "logit_scale" in dict(model.named_buffers())
    assert count_parameters(model.aggregator, trainable_only=True) == 0
    assert model(batch_for(cfg))["logit_scale"].item() == pytest.approx(2.0)


def test_build_downstream_model_modes():
    cfg = Config()
    enc = create_ecg_encoder("otis_tiny")
    probe = build_downstream_model(cfg, enc)
    assert probe.freeze_encoder and count_parameters(probe.encoder, trainable_only=True) == 0
    assert probe.head.n_out == 1
    ft = build_downstream_model(
        apply_overrides(cfg, {"downstream.mode": "finetune", "downstream.task": "echonext"}),
        create_ecg_encoder("otis_tiny"),
    )
    assert not ft.freeze_encoder and ft.head.n_out == 12
    assert count_parameters(ft.encoder, trainable_only=True) == count_parameters(ft.encoder)
    with pytest.raises(ValueError, match="probe"):
        build_downstream_model(apply_overrides(cfg, {"downstream.mode": "zero-shot"}), enc)


def test_build_frame_encoder_is_seeded_and_sized_from_config():
    cfg = apply_overrides(Config(), {"feature.feature_dim": 24, "feature.image_size": 32, "feature.seed": 3})
    a, b = build_frame_encoder(cfg), build_frame_encoder(cfg)
    other = build_frame_encoder(apply_overrides(cfg, {"feature.seed": 4}))
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k
    assert not torch.equal(a.proj.weight, other.proj.weight)
    assert a(prepare_frames(torch.rand(2, 50, 50), 32)).shape == (2, 16, 24)
