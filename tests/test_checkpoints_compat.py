"""Public checkpoint layouts (OTIS, EchoingECG, DINOv2) load key for key and reproduce an independent
plain-tensor forward; our own checkpoints round-trip from the file alone."""

from __future__ import annotations

import argparse
import math

import numpy as np
import pytest
import torch

from stence.config import Config, apply_overrides, to_dict
from stence.models.checkpoint import (
    load_aggregator,
    load_aggregator_weights,
    load_encoder,
    load_stence,
    save_aggregator,
    save_encoder,
    save_stence,
)
from stence.models.echoingecg import load_echoingecg_checkpoint
from stence.models.otis import load_otis_checkpoint
from stence.models.registry import build_stence_model, create_ecg_encoder
from tests.ref_ops import DT, gelu, heads_attention, lin, ln, r, softmax

pytestmark = pytest.mark.usefixtures("one_thread")  # small models: no OpenMP spinning (conftest)



# ---------------------------------------------------------------------------------------------------
# OTIS


def otis_public_state(D=64, depth=2, n_time=40, lead_rows=32, mlp="gelu", hidden=None, seed=0):
    """A state dict spelled out in the public OTIS key layout, plus pretraining-only parts."""
    g = torch.Generator().manual_seed(seed)
    t = np.arange(n_time)[:, None] / 10000 ** (np.arange(D // 4) / (D / 4))
    table = np.concatenate([np.zeros((1, D // 2)), np.concatenate([np.sin(t), np.cos(t)], 1)])
    sd = {
        "cls_token": r(1, 1, D, g=g),
        "pos_embed_x": torch.tensor(table, dtype=torch.float32)[None],
        "pos_embed_y.weight": torch.cat([torch.zeros(1, D // 2), r(lead_rows - 1, D // 2, g=g)]),
        "patch_embed.proj.weight": r(D, 1, 1, 24, scale=0.3, g=g),
        "patch_embed.proj.bias": r(D, g=g),
        "patch_embed.norm.weight": 1 + r(D, g=g),
        "patch_embed.norm.bias": r(D, g=g),
        "norm.weight": 1 + r(D, g=g),
        "norm.bias": r(D, g=g),
        # pretraining-only parts the encoder ignores
        "mask_token": r(1, 1, 32, g=g),
        "decoder_embed.weight": r(32, D, g=g),
        "decoder_pos_embed_x": r(1, 1 + n_time, 16, g=g),
        "decoder_blocks.0.norm1.weight": r(32, g=g),
        "decoder_pred.weight": r(24, 32, g=g),
        "projector.0.weight": r(1024, D, g=g),
        "projector.1.running_mean": r(1024, g=g),
    }
    hidden = hidden or 4 * D
    for i in range(depth):
        p = f"blocks.{i}."
        sd.update(
            {
                p + "norm1.weight": 1 + r(D, g=g),
                p + "norm1.bias": r(D, g=g),
                p + "attn.qkv.weight": r(3 * D, D, scale=0.2, g=g),
                p + "attn.qkv.bias": r(3 * D, g=g),
                p + "attn.mha.in_proj_weight": r(3 * D, D, scale=0.2, g=g),
                p + "attn.mha.in_proj_bias": r(3 * D, g=g),
                p + "attn.mha.out_proj.weight": r(D, D, scale=0.2, g=g),
                p + "attn.mha.out_proj.bias": r(D, g=g),
                p + "attn.proj.weight": r(D, D, scale=0.2, g=g),
                p + "attn.proj.bias": r(D, g=g),
                p + "norm2.weight": 1 + r(D, g=g),
                p + "norm2.bias": r(D, g=g),
                p + "mlp.fc2.weight": r(D, hidden, scale=0.2, g=g),
                p + "mlp.fc2.bias": r(D, g=g),
            }
        )
        if mlp == "gelu":
            sd.update(
                {p + "mlp.fc1.weight": r(hidden, D, scale=0.2, g=g), p + "mlp.fc1.bias": r(hidden, g=g)}
            )
        else:
            sd.update(
                {
                    p + "mlp.fc1_g.weight": r(hidden, D, scale=0.2, g=g),
                    p + "mlp.fc1_g.bias": r(hidden, g=g),
                    p + "mlp.fc1_x.weight": r(hidden, D, scale=0.2, g=g),
                    p + "mlp.fc1_x.bias": r(hidden, g=g),
                }
            )
            if mlp == "swiglu_norm":
                sd.update({p + "mlp.norm.weight": 1 + r(hidden, g=g), p + "mlp.norm.bias": r(hidden, g=g)})
    return sd


def save_otis(path, sd, offsets=None):
    offsets = offsets if offsets is not None else {"eeg": 0, "ecg": 19}
    torch.save(
        {
            "model": sd,
            "domains": {"ecg": torch.Size([1, 12, 2500]), "eeg": torch.Size([1, 19, 3000])},
            "domain_offsets": offsets,
            "args": argparse.Namespace(model="otis_tinyDeep_dec160d4b_patchX", input_size=(1, 12, 1000)),
            "epoch": 3,
        },
        path,
    )


def interp_reference(table: np.ndarray, n: int) -> np.ndarray:
    """Linear resampling with align_corners=False written out with np.interp, CLS row kept."""
    rows = table[1:]
    m = rows.shape[0]
    src = np.clip((np.arange(n) + 0.5) * m / n - 0.5, 0, m - 1)
    out = np.stack([np.interp(src, np.arange(m), rows[:, c]) for c in range(rows.shape[1])], axis=1)
    return np.concatenate([table[:1], out])


def otis_reference(sd, table, x, lead_ids, heads, mlp):
    """CLS embedding of the public OTIS forward, with plain tensor ops in float64."""
    sd = {k: v.to(DT) for k, v in sd.items()}
    table = torch.as_tensor(table, dtype=DT)
    x = x.to(DT)
    B, L, T = x.shape
    D = sd["cls_token"].shape[-1]
    n_t = T // 24
    patches = x[..., : n_t * 24].reshape(B, L, n_t, 24)
    tok = patches @ sd["patch_embed.proj.weight"].reshape(D, 24).T + sd["patch_embed.proj.bias"]
    tok = gelu(ln(tok, sd["patch_embed.norm.weight"], sd["patch_embed.norm.bias"], 1e-5))
    lead = sd["pos_embed_y.weight"][lead_ids][:, None, :].expand(L, n_t, D // 2)
    time = table[1 : n_t + 1][None].expand(L, n_t, D // 2)
    tok = (tok + torch.cat([lead, time], -1)).reshape(B, L * n_t, D)
    cls = sd["cls_token"] + torch.cat([torch.zeros(D // 2, dtype=DT), table[0]])
    h = torch.cat([cls.expand(B, 1, D), tok], 1)
    depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    for i in range(depth):
        p = f"blocks.{i}."
        y = ln(h, sd[p + "norm1.weight"], sd[p + "norm1.bias"], 1e-6)
        qkv = lin(y, sd, p + "attn.qkv")
        w_in, b_in = sd[p + "attn.mha.in_proj_weight"], sd[p + "attn.mha.in_proj_bias"]
        q, k, v = (
            qkv[..., s * D : (s + 1) * D] @ w_in[s * D : (s + 1) * D].T + b_in[s * D : (s + 1) * D]
            for s in range(3)
        )
        a = heads_attention(q, k, v, heads)
        h = h + lin(lin(a, sd, p + "attn.mha.out_proj"), sd, p + "attn.proj")
        y = ln(h, sd[p + "norm2.weight"], sd[p + "norm2.bias"], 1e-6)
        if mlp == "gelu":
            m = gelu(lin(y, sd, p + "mlp.fc1"))
        else:
            gate = lin(y, sd, p + "mlp.fc1_g")
            m = gate * torch.sigmoid(gate) * lin(y, sd, p + "mlp.fc1_x")
            if mlp == "swiglu_norm":
                m = ln(m, sd[p + "mlp.norm.weight"], sd[p + "mlp.norm.bias"], 1e-5)
        h = h + lin(m, sd, p + "mlp.fc2")
    h = ln(h, sd["norm.weight"], sd["norm.bias"], 1e-6)
    return h[:, 0]


@pytest.mark.parametrize("mlp", ["gelu", "swiglu", "swiglu_norm"])
def test_otis_public_checkpoint_loads_interpolates_and_matches_reference(tmp_path, mlp):
    hidden = 96 if mlp != "gelu" else None
    sd = otis_public_state(mlp=mlp, hidden=hidden, n_time=40)
    path = tmp_path / "otis.pth"
    save_otis(path, sd)
    enc = load_otis_checkpoint("otis_tiny", str(path), drop_path=0.0).eval()  # 1500 samples -> 62 patches
    assert enc.init_kwargs["mlp"] == ("gelu" if mlp == "gelu" else "swiglu")
    own = enc.state_dict()
    table = interp_reference(sd["pos_embed_x"][0].numpy().astype(np.float64), 62)
    np.testing.assert_allclose(own["pos_embed_x"][0].numpy(), table, atol=1e-5)  # float32 index maths
    mapped = [k for k in sd if k in own]
    for k in mapped:
        if k != "pos_embed_x":
            assert torch.equal(own[k], sd[k]), k
    assert set(own) - set(mapped) == set(), (
        f"encoder keys not taken from the checkpoint: {set(own) - set(mapped)}"
    )
    assert enc.lead_ids.tolist() == [1 + 19 + i for i in range(12)]
    x = torch.randn(2, 12, 1500, generator=torch.Generator().manual_seed(5))
    ref = otis_reference(sd, table, x, enc.lead_ids, heads=2, mlp=mlp)
    with torch.no_grad():
        for impl in ("mha", "fused"):
            enc.set_attn_impl(impl)
            torch.testing.assert_close(enc(x).to(DT), ref, atol=2e-4, rtol=1e-4)


def test_otis_longer_checkpoint_table_is_kept_and_model_instance_path(tmp_path):
    sd = otis_public_state(n_time=100, seed=1)
    path = tmp_path / "otis.pth"
    save_otis(path, sd, offsets={"ecg": 0, "eeg": 12})
    model = create_ecg_encoder("otis_tiny", drop_path=0.0)
    enc = load_otis_checkpoint(model, str(path)).eval()
    assert torch.equal(enc.state_dict()["pos_embed_x"], sd["pos_embed_x"])
    assert enc.lead_ids.tolist() == list(range(1, 13))
    x = torch.randn(1, 12, 1500)
    with torch.no_grad():
        torch.testing.assert_close(
            enc(x).to(DT),
            otis_reference(sd, sd["pos_embed_x"][0], x, enc.lead_ids, 2, "gelu"),
            atol=2e-4,
            rtol=1e-4,
        )
    # the encoder's own loader, and the size inferred from the checkpoint alone, give the same model
    via_method = model.load_pretrained(str(path)).eval()
    inferred = load_otis_checkpoint(None, str(path), drop_path=0.0).eval()
    assert inferred.arch["name"] == "otis_tiny"
    with torch.no_grad():
        torch.testing.assert_close(via_method(x), enc(x))
        torch.testing.assert_close(inferred(x), enc(x))


def test_otis_missing_keys_and_unknown_domain_are_refused(tmp_path):
    sd = otis_public_state()
    del sd["blocks.1.attn.mha.in_proj_weight"]
    path = tmp_path / "broken.pth"
    save_otis(path, sd)
    with pytest.raises(ValueError, match=r"blocks\.1\.attn\.mha\.in_proj_weight"):
        load_otis_checkpoint("otis_tiny", str(path))
    sd = otis_public_state()
    save_otis(path, sd, offsets={"eeg": 0, "emg": 19})
    with pytest.raises(ValueError, match="ecg"):
        load_otis_checkpoint("otis_tiny", str(path))
    sd["blocks.0.ls1.gamma"] = torch.ones(64)  # a layout the encoder does not implement
    save_otis(path, sd)
    with pytest.raises(ValueError, match="ls1.gamma"):
        load_otis_checkpoint("otis_tiny", str(path))


# ---------------------------------------------------------------------------------------------------
# EchoingECG


def bn_state(prefix, n, g):
    return {
        prefix + "weight": 1 + r(n, g=g),
        prefix + "bias": r(n, g=g),
        prefix + "running_mean": r(n, g=g),
        prefix + "running_var": 1 + r(n, g=g).abs(),
        prefix + "num_batches_tracked": torch.tensor(7),
    }


def echoingecg_public_state(layers=(2, 1, 1, 1), init_dim=8, embed=32, gpo=8, seed=0):
    """The public `echoingecg.pt` layout: ecg_encoder.* (with the std branch) and text_encoder.* keys."""
    g = torch.Generator().manual_seed(seed)
    e = "ecg_encoder."
    sd = {e + "conv1.weight": r(init_dim, 12, 7, scale=0.3, g=g), **bn_state(e + "bn1.", init_dim, g)}
    ni = init_dim
    for li, (n, f) in enumerate(zip(layers, (2, 4, 8, 16), strict=True), start=1):
        nf = init_dim * f
        for bi in range(n):
            p = f"{e}layer{li}.{bi}."
            sd[p + "conv1.weight"] = r(nf, ni, 3, scale=0.3, g=g)
            sd.update(bn_state(p + "bn1.", nf, g))
            sd[p + "conv2.weight"] = r(nf, nf, 3, scale=0.3, g=g)
            sd.update(bn_state(p + "bn2.", nf, g))
            if ni != nf or (bi == 0 and li > 1):
                sd[p + "shortcut.0.weight"] = r(nf, ni, 1, scale=0.3, g=g)
                sd.update(bn_state(p + "shortcut.1.", nf, g))
            ni = nf
    for branch in ("", "std_"):
        sd[f"{e}{branch}linear.weight"] = r(embed, ni, g=g)
        sd[f"{e}{branch}linear.bias"] = r(embed, g=g)
        gp = f"{e}{branch}gpool."
        for sfx in ("", "_reverse"):
            sd[f"{gp}gru.weight_ih_l0{sfx}"] = r(3 * gpo, gpo, scale=0.5, g=g)
            sd[f"{gp}gru.weight_hh_l0{sfx}"] = r(3 * gpo, gpo, scale=0.5, g=g)
            sd[f"{gp}gru.bias_ih_l0{sfx}"] = r(3 * gpo, g=g)
            sd[f"{gp}gru.bias_hh_l0{sfx}"] = r(3 * gpo, g=g)
        sd[gp + "linear.weight"] = r(1, gpo, scale=1.0, g=g)
    sd["text_encoder.bert.embeddings.word_embeddings.weight"] = r(10, 4, g=g)
    return sd


def conv1d_ref(x, w, stride, pad):
    B, C, T = x.shape
    z = torch.zeros(B, C, pad, dtype=x.dtype)
    cols = torch.cat([z, x, z], -1).unfold(2, w.shape[-1], stride)  # (B, C, T_out, K)
    return torch.einsum("bctk,ock->bot", cols, w)


def bn_ref(x, sd, p):
    return (x - sd[p + "running_mean"][:, None]) / torch.sqrt(sd[p + "running_var"][:, None] + 1e-5) * sd[
        p + "weight"
    ][:, None] + sd[p + "bias"][:, None]


def gru_ref(xs, sd, p, sfx, hidden):
    w_ih, w_hh = sd[f"{p}weight_ih_l0{sfx}"], sd[f"{p}weight_hh_l0{sfx}"]
    b_ih, b_hh = sd[f"{p}bias_ih_l0{sfx}"], sd[f"{p}bias_hh_l0{sfx}"]
    h = torch.zeros(hidden, dtype=xs.dtype)
    outs = []
    for x in xs:
        gi, gh = w_ih @ x + b_ih, w_hh @ h + b_hh
        rr = torch.sigmoid(gi[:hidden] + gh[:hidden])
        z = torch.sigmoid(gi[hidden : 2 * hidden] + gh[hidden : 2 * hidden])
        n = torch.tanh(gi[2 * hidden :] + rr * gh[2 * hidden :])
        h = (1 - z) * n + z * h
        outs.append(h)
    return torch.stack(outs)


def echoingecg_reference(sd, x, layers):
    sd = {k.removeprefix("ecg_encoder."): v.to(DT) for k, v in sd.items() if k.startswith("ecg_encoder.")}
    h = torch.relu(bn_ref(conv1d_ref(x.to(DT), sd["conv1.weight"], 2, 3), sd, "bn1."))
    for li, n in enumerate(layers, start=1):
        for bi in range(n):
            p = f"layer{li}.{bi}."
            stride = 2 if (bi == 0 and li > 1) else 1
            out = torch.relu(bn_ref(conv1d_ref(h, sd[p + "conv1.weight"], stride, 1), sd, p + "bn1."))
            out = bn_ref(conv1d_ref(out, sd[p + "conv2.weight"], 1, 1), sd, p + "bn2.")
            short = h
            if p + "shortcut.0.weight" in sd:
                short = bn_ref(conv1d_ref(h, sd[p + "shortcut.0.weight"], stride, 0), sd, p + "shortcut.1.")
            h = torch.relu(out + short)
    feats = h.transpose(1, 2) @ sd["linear.weight"].T + sd["linear.bias"]  # (B, L, E)
    L, d = feats.shape[1], sd["gpool.gru.weight_hh_l0"].shape[1]
    pe = torch.zeros(L, d, dtype=DT)
    for pos in range(L):
        for i in range(0, d, 2):
            pe[pos, i] = math.sin(pos / 10000 ** (i / d))
            pe[pos, i + 1] = math.cos(pos / 10000 ** (i / d))
    fwd = gru_ref(pe, sd, "gpool.gru.", "", d)
    bwd = gru_ref(pe.flip(0), sd, "gpool.gru.", "_reverse", d).flip(0)
    scores = ((fwd + bwd) / 2) @ sd["gpool.linear.weight"].T  # (L, 1)
    w = softmax(scores / 0.1, 0)
    pooled = (feats.sort(dim=1, descending=True).values * w[None]).sum(1)
    return pooled / (pooled.pow(2).sum(-1, keepdim=True).sqrt() + 1e-8)


def test_echoingecg_public_checkpoint_loads_and_matches_reference(tmp_path):
    layers = (2, 1, 1, 1)
    sd = echoingecg_public_state(layers=layers)
    path = tmp_path / "echoingecg.pt"
    torch.save(sd, path)
    enc = load_echoingecg_checkpoint("echoingecg", str(path), fs=100, n_samples=400).eval()
    assert enc.init_kwargs["layers"] == list(layers) and enc.embed_dim == 32
    own = enc.state_dict()
    taken = {k.removeprefix("ecg_encoder.") for k in sd if k.startswith("ecg_encoder.") and "std_" not in k}
    assert taken == set(own) - {"input_scaler.center", "input_scaler.scale"}
    for k in taken:
        assert torch.equal(own[k], sd["ecg_encoder." + k]), k
    x = torch.randn(2, 12, 400, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(enc(x).to(DT), echoingecg_reference(sd, x, layers), atol=1e-5, rtol=1e-4)
    del sd["ecg_encoder.layer2.0.bn1.running_var"]
    torch.save(sd, path)
    with pytest.raises(ValueError, match="layer2.0.bn1.running_var"):
        load_echoingecg_checkpoint("echoingecg", str(path))


# ---------------------------------------------------------------------------------------------------
# our own checkpoints


@pytest.mark.parametrize("name", ["otis_tiny", "echoingecg_tiny"])
def test_encoder_round_trip(tmp_path, name):
    torch.manual_seed(0)
    enc = create_ecg_encoder(name, fs=500, n_samples=1500, lead_order="mimic").eval()
    path = tmp_path / "enc.pt"
    save_encoder(path, enc, to_dict(Config()), extra={"epoch": 4})
    back = load_encoder(path).eval()
    payload = torch.load(path, weights_only=True)
    assert payload["input_spec"] == enc.input_spec and payload["arch"]["name"] == name
    assert payload["config"]["model"]["ecg"] == "otis_tiny" and payload["extra"] == {"epoch": 4}
    x = torch.randn(2, 12, 1500)
    with torch.no_grad():
        torch.testing.assert_close(back(x), enc(x), rtol=0, atol=0)


def test_loaded_public_weights_round_trip_with_their_table_shapes(tmp_path):
    sd = otis_public_state(mlp="swiglu", hidden=96, n_time=40)
    save_otis(tmp_path / "otis.pth", sd)
    enc = load_otis_checkpoint("otis_tiny", str(tmp_path / "otis.pth")).eval()
    save_encoder(tmp_path / "enc.pt", enc)
    back = load_encoder(tmp_path / "enc.pt").eval()
    assert back.init_kwargs["mlp"] == "swiglu" and back.pos_embed_y.weight.shape[0] == 32
    x = torch.randn(1, 12, 1500)
    with torch.no_grad():
        torch.testing.assert_close(back(x), enc(x), rtol=0, atol=0)


def test_stence_and_aggregator_round_trip(tmp_path):
    torch.manual_seed(0)
    cfg = apply_overrides(Config(), {"loss.learnable_temperature": True, "model.ecg": "echoingecg_tiny"})
    model = build_stence_model(cfg).eval()
    with torch.no_grad():
        model.logit_scale.fill_(2.5)
    batch = {
        "ecg": torch.randn(2, 12, 1500),
        "angio_feats": torch.randn(2, 3, 64, 64),
        "view_mask": torch.tensor([[True, True, False], [True, False, False]]),
        "angles": torch.randn(2, 3, 2) * 20,
    }
    path = tmp_path / "stence.pt"
    save_stence(path, model, to_dict(cfg))
    back = load_stence(path).eval()
    with torch.no_grad():
        a, b = model(batch), back(batch)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    enc = load_encoder(path).eval()  # the ECG tower of a StenCE checkpoint, for downstream use
    with torch.no_grad():
        torch.testing.assert_close(enc(batch["ecg"]), model.ecg_encoder(batch["ecg"]), rtol=0, atol=0)
    # stage A -> stage B: aggregator weights from an aggregator or a StenCE file
    save_aggregator(tmp_path / "agg.pt", model.aggregator)
    agg = load_aggregator(tmp_path / "agg.pt")
    fresh = build_stence_model(apply_overrides(cfg, {"model.angio_checkpoint": str(tmp_path / "agg.pt")}))
    for other in (agg, fresh.aggregator, load_aggregator_weights(build_stence_model(cfg).aggregator, path)):
        for k, v in model.aggregator.state_dict().items():
            assert torch.equal(other.state_dict()[k], v), k
    with pytest.raises(ValueError, match="aggregator"):
        load_aggregator(path)
