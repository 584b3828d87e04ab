"""The public DINOv2 checkpoint layout loads key for key and reproduces an independent plain-tensor forward."""

from __future__ import annotations

import pytest
import torch

from stence.models.frame_encoder import load_dinov2_checkpoint
from stence.models.registry import create_frame_encoder
from tests.ref_ops import DT, gelu, heads_attention, lin, ln, r

pytestmark = pytest.mark.usefixtures("one_thread")  # small models: no OpenMP spinning (conftest)


def dinov2_public_state(D=64, depth=2, patch=8, grid=8, chunked=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    sd = {
        "cls_token": r(1, 1, D, g=g),
        "pos_embed": r(1, 1 + grid * grid, D, g=g),
        "mask_token": r(1, D, g=g),
        "patch_embed.proj.weight": r(D, 3, patch, patch, g=g),
        "patch_embed.proj.bias": r(D, g=g),
        "norm.weight": 1 + r(D, g=g),
        "norm.bias": r(D, g=g),
    }
    for i in range(depth):
        p = f"blocks.0.{i}." if chunked else f"blocks.{i}."
        sd.update(
            {
                p + "norm1.weight": 1 + r(D, g=g),
                p + "norm1.bias": r(D, g=g),
                p + "attn.qkv.weight": r(3 * D, D, scale=0.2, g=g),
                p + "attn.qkv.bias": r(3 * D, g=g),
                p + "attn.proj.weight": r(D, D, scale=0.2, g=g),
                p + "attn.proj.bias": r(D, g=g),
                p + "ls1.gamma": 1 + r(D, g=g),
                p + "norm2.weight": 1 + r(D, g=g),
                p + "norm2.bias": r(D, g=g),
                p + "mlp.fc1.weight": r(4 * D, D, scale=0.2, g=g),
                p + "mlp.fc1.bias": r(4 * D, g=g),
                p + "mlp.fc2.weight": r(D, 4 * D, scale=0.2, g=g),
                p + "mlp.fc2.bias": r(D, g=g),
                p + "ls2.gamma": 1 + r(D, g=g),
            }
        )
    return sd


def dinov2_reference(sd, proj, images, heads, patch):
    sd = {k: v.to(DT) for k, v in sd.items()}
    x = images.to(DT)
    N, C, H, W = x.shape
    gh, gw = H // patch, W // patch
    patches = x.reshape(N, C, gh, patch, gw, patch).permute(0, 2, 4, 1, 3, 5).reshape(N, gh * gw, -1)
    D = sd["cls_token"].shape[-1]
    tok = patches @ sd["patch_embed.proj.weight"].reshape(D, -1).T + sd["patch_embed.proj.bias"]
    h = torch.cat([sd["cls_token"].expand(N, 1, D), tok], 1) + sd["pos_embed"]
    depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    for i in range(depth):
        p = f"blocks.{i}."
        y = ln(h, sd[p + "norm1.weight"], sd[p + "norm1.bias"], 1e-6)
        qkv = lin(y, sd, p + "attn.qkv")
        a = heads_attention(qkv[..., :D], qkv[..., D : 2 * D], qkv[..., 2 * D :], heads)
        h = h + lin(a, sd, p + "attn.proj") * sd[p + "ls1.gamma"]
        y = ln(h, sd[p + "norm2.weight"], sd[p + "norm2.bias"], 1e-6)
        h = h + lin(gelu(lin(y, sd, p + "mlp.fc1")), sd, p + "mlp.fc2") * sd[p + "ls2.gamma"]
    h = ln(h, sd["norm.weight"], sd["norm.bias"], 1e-6)[:, 1:]
    return h @ proj["weight"].to(DT).T + proj["bias"].to(DT)


@pytest.mark.parametrize("chunked", [False, True])
def test_dinov2_checkpoint_loads_and_matches_reference(tmp_path, chunked):
    sd = dinov2_public_state(chunked=chunked)
    path = tmp_path / "dinov2.pth"
    torch.save(sd, path)
    enc = load_dinov2_checkpoint(create_frame_encoder("dinov2_tiny", feature_dim=16), str(path)).eval()
    flat = {
        k.replace("blocks.0.", "blocks.", 1) if chunked and k.startswith("blocks.0.") else k: v
        for k, v in sd.items()
    }
    own = enc.state_dict()
    assert set(own) - set(flat) == {"proj.weight", "proj.bias"}
    for k, v in flat.items():
        assert torch.equal(own[k], v), k
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    proj = {"weight": own["proj.weight"], "bias": own["proj.bias"]}
    ref = dinov2_reference(flat, proj, images, heads=2, patch=8)
    with torch.no_grad():
        torch.testing.assert_close(enc(images).to(DT), ref, atol=1e-4, rtol=1e-4)


def test_dinov2_position_table_is_resized_to_the_encoder_grid(tmp_path):
    sd = dinov2_public_state(grid=4)
    sd["pos_embed"][:, 1:] = torch.linspace(-1, 1, 64)  # constant over the grid
    path = tmp_path / "dinov2.pth"
    torch.save(sd, path)
    enc = load_dinov2_checkpoint(create_frame_encoder("dinov2_tiny"), str(path))
    pos = enc.state_dict()["pos_embed"]
    assert pos.shape == (1, 65, 64)
    torch.testing.assert_close(pos[:, 0], sd["pos_embed"][:, 0])
    torch.testing.assert_close(pos[0, 1:], torch.linspace(-1, 1, 64).expand(64, 64), atol=1e-5, rtol=0)
