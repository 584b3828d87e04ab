"""DINOv2-compatible patch-feature extractor for angiography key frames.

Key names follow facebookresearch/dinov2 `vision_transformer.py` (`cls_token`, `pos_embed`, `mask_token`,
`patch_embed.proj`, `blocks.N.{norm1, attn.qkv, attn.proj, ls1.gamma, norm2, mlp.fc1, mlp.fc2, ls2.gamma}`,
`norm`), so DINOv2 ViT-S/14 weights load from a local file (never downloaded here). The output is the
normalised patch tokens (no CLS) through a Linear projection to the cached feature width.

`convstem_tiny` keeps that layout but replaces the one-layer patch embedding by a small conv stem (keys under
`patch_embed.stem`, ours): a ViT cannot learn vessel-scale structure from the few hundred key frames of a
small cohort when trained from scratch, a conv stem can (stage A trains it end to end).
"""

from __future__ import annotations

import math
import re
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from stence.models.base import DropPath, load_matching
from stence.models.catalog import register_frame_encoder
from stence.models.otis import Mlp  # same fc1 -> GELU -> fc2 module and keys as DINOv2
from stence.models.safe_load import CheckpointError, safe_torch_load

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class PatchEmbed(nn.Module):
    """Conv2d(3 -> D, p, stride p): (N, 3, H, W) -> (N, (H/p) * (W/p), D)."""

    def __init__(self, patch_size: int, embed_dim: int):
        super().__init__()
        self.proj = nn.Conv2d(3, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


def _conv_bn_relu(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)
    )


def local_contrast(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """(N, 1, H, W) -> background-subtracted, per-image standardised (N, 1, H, W).

    Subtracts a Gaussian blur (soft tissue, diaphragm, exposure) so that vessel-scale structure remains,
    then divides by the image's standard deviation (contrast dose, detector gain). Parameter-free.
    """
    k = 2 * int(round(3 * sigma)) + 1
    g = torch.exp(-0.5 * ((torch.arange(k, device=x.device, dtype=x.dtype) - k // 2) / sigma) ** 2)
    g = g / g.sum()
    blur = F.pad(x, (k // 2,) * 4, mode="replicate")
    blur = F.conv2d(F.conv2d(blur, g.view(1, 1, 1, k)), g.view(1, 1, k, 1))  # separable Gaussian
    hp = x - blur
    return hp / (hp.flatten(1).std(dim=1).view(-1, 1, 1, 1) + 1e-3)


class ConvPatchEmbed(nn.Module):
    """Conv stem as patch embedding: (N, 3, H, W) -> (N, (H/8) * (W/8), D).

    Local contrast normalisation of the grey image, then conv-BN-ReLU stages (stride 2, max-pool 2,
    max-pool 2) down to one token per 8 x 8 pixels, the last one D wide. Ending in BN + ReLU matters: the
    tokens are sparse, non-negative detector responses on a common scale, which the aggregator's
    cross-attention picks up far faster than a plain linear projection's output.
    """

    patch_size = 8

    def __init__(self, embed_dim: int, width: int = 16, sigma: float = 3.0):
        super().__init__()
        self.sigma = float(sigma)
        self.stem = nn.Sequential(
            _conv_bn_relu(1, width, stride=2),
            _conv_bn_relu(width, width),
            nn.MaxPool2d(2),
            _conv_bn_relu(width, 2 * width),
            nn.MaxPool2d(2),
            _conv_bn_relu(2 * width, embed_dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = local_contrast(x.mean(dim=1, keepdim=True), self.sigma)  # (N, 3, H, W) -> (N, 1, H, W)
        return self.stem(g).flatten(2).transpose(1, 2)  # (N, D, H/8, W/8) -> (N, P, D)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, D = x.shape
        qkv = self.qkv(x).view(B, N, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])  # (B, H, N, hd)
        return self.proj(a.transpose(1, 2).reshape(B, N, D))


class LayerScale(nn.Module):
    def __init__(self, dim: int, init: float):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, ls_init: float, drop_path: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.ls1 = LayerScale(dim, ls_init)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.ls2 = LayerScale(dim, ls_init)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.ls1(self.attn(self.norm1(x))))
        return x + self.drop_path(self.ls2(self.mlp(self.norm2(x))))


class FrameEncoder(nn.Module):
    """ViT with DINOv2 keys: images (N, 3, S, S) -> patch features (N, (S/p)^2, feature_dim)."""

    def __init__(
        self,
        img_size: int = 518,
        patch_size: int = 14,
        embed_dim: int = 384,
        depth: int = 12,
        num_heads: int = 6,
        mlp_ratio: float = 4.0,
        feature_dim: int = 512,
        ls_init: float = 1.0,
        drop_path: float = 0.0,
        stem: str = "patch",  # "patch": DINOv2's Conv2d(p, stride p); "conv": ConvPatchEmbed (patch_size 8)
        stem_width: int = 16,  # channels of the first conv stage (stem "conv")
        pos_std: float = 0.02,  # init std of the positional embedding
    ):
        super().__init__()
        if stem not in ("patch", "conv"):
            raise ValueError(f"stem must be 'patch' or 'conv', got {stem!r}")
        if stem == "conv" and patch_size != ConvPatchEmbed.patch_size:
            raise ValueError(f"the conv stem has patch size {ConvPatchEmbed.patch_size}, got {patch_size}")
        self.init_kwargs: dict[str, Any] = dict(
            img_size=img_size,
            patch_size=patch_size,
            embed_dim=embed_dim,
            depth=depth,
            num_heads=num_heads,
            mlp_ratio=mlp_ratio,
            feature_dim=feature_dim,
            ls_init=ls_init,
            drop_path=drop_path,
            stem=stem,
            stem_width=stem_width,
            pos_std=pos_std,
        )
        self.arch: dict[str, Any] = {"name": type(self).__name__, "overrides": {}}
        self.img_size, self.patch_size = img_size, patch_size
        self.grid = img_size // patch_size
        self.embed_dim, self.feature_dim = embed_dim, feature_dim
        self.patch_embed: nn.Module = (
            PatchEmbed(patch_size, embed_dim) if stem == "patch" else ConvPatchEmbed(embed_dim, stem_width)
        )
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.grid**2, embed_dim))
        self.register_buffer("mask_token", torch.zeros(1, embed_dim))  # DINOv2 key; unused at inference
        rates = torch.linspace(0, drop_path, depth).tolist()
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_ratio, ls_init, r) for r in rates)
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.proj = nn.Linear(embed_dim, feature_dim)
        nn.init.trunc_normal_(self.pos_embed, std=pos_std)
        nn.init.normal_(self.cls_token, std=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    @property
    def n_patches(self) -> int:
        return self.grid**2

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, S, S) -> (N, (S/p)^2, feature_dim) normalised, projected patch tokens."""
        if images.shape[-2:] != (self.img_size, self.img_size):
            raise ValueError(f"expected {self.img_size} px images, got {tuple(images.shape[-2:])}")
        x = self.patch_embed(images)  # (N, P, D)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed  # (N, 1+P, D)
        for blk in self.blocks:
            x = blk(x)
        return self.proj(self.norm(x)[:, 1:])  # (N, P, D) -> (N, P, F)


@register_frame_encoder("dinov2_vits14")
def dinov2_vits14(**kw: Any) -> FrameEncoder:
    """DINOv2 ViT-S/14 at 518 px: 37 x 37 patches, 384-d, projected to feature_dim (paper: 512)."""
    return FrameEncoder(
        **{
            "img_size": 518,
            "patch_size": 14,
            "embed_dim": 384,
            "depth": 12,
            "num_heads": 6,
            "feature_dim": 512,
            **kw,
        }
    )


@register_frame_encoder("dinov2_tiny")
def dinov2_tiny(**kw: Any) -> FrameEncoder:
    """CPU preset: 64 px, patch 8 (8 x 8 patches), D 64, depth 2, 2 heads."""
    return FrameEncoder(
        **{
            "img_size": 64,
            "patch_size": 8,
            "embed_dim": 64,
            "depth": 2,
            "num_heads": 2,
            "feature_dim": 64,
            **kw,
        }
    )


@register_frame_encoder("convstem_tiny")
def convstem_tiny(**kw: Any) -> FrameEncoder:
    """CPU preset trained end to end in stage A: conv stem (one token per 8 x 8 pixels, 8 x 8 at 64 px),
    D 64, one ViT block, 2 heads; DINOv2 key layout (plus `patch_embed.stem`)."""
    return FrameEncoder(
        **{
            "img_size": 64,
            "patch_size": 8,
            "embed_dim": 64,
            "depth": 1,
            "num_heads": 2,
            "feature_dim": 64,
            "stem": "conv",
            "stem_width": 16,
            "pos_std": 0.5,
            **kw,
        }
    )


def prepare_frames(frames: torch.Tensor, size: int) -> torch.Tensor:
    """Frames (N, H, W) in [0, 1] -> (N, 3, size, size): bilinear resize, 3 channels, ImageNet normalisation."""
    x = frames.float()[:, None]  # (N, 1, H, W)
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    return (x.expand(-1, 3, -1, -1) - mean) / std


def interpolate_pos_embed(pos_embed: torch.Tensor, grid: int) -> torch.Tensor:
    """(1, 1 + g0^2, D) -> (1, 1 + grid^2, D), bicubic over the patch grid; the CLS row is kept."""
    n = pos_embed.shape[1] - 1
    g0 = int(math.isqrt(n))
    if g0 * g0 != n:
        raise ValueError(f"pos_embed has {n} patch rows, not a square grid")
    if g0 == grid:
        return pos_embed
    D = pos_embed.shape[-1]
    patch = pos_embed[:, 1:].reshape(1, g0, g0, D).permute(0, 3, 1, 2)  # (1, D, g0, g0)
    patch = F.interpolate(patch.float(), size=(grid, grid), mode="bicubic", align_corners=False)
    return torch.cat([pos_embed[:, :1], patch.permute(0, 2, 3, 1).reshape(1, grid * grid, D)], dim=1)


def load_dinov2_checkpoint(model: FrameEncoder, path: str) -> FrameEncoder:
    """Load DINOv2 backbone weights from a local file into `model` (the projection keeps its init); the file
    is read weights-only, a pickle referencing code is refused (CheckpointError)."""
    raw = safe_torch_load(path, "frame encoder checkpoint")
    for key in ("teacher", "model", "state_dict"):
        if isinstance(raw, dict) and key in raw and isinstance(raw[key], dict):
            raw = raw[key]
    if not isinstance(raw, dict):
        raise CheckpointError(
            f"frame encoder checkpoint {path}: expected a state dict, got {type(raw).__name__}"
        )
    sd = {}
    for k, v in raw.items():
        k = re.sub(r"^(module\.|backbone\.)", "", k)
        k = re.sub(r"^blocks\.\d+\.(\d+)\.", r"blocks.\1.", k)  # chunked blocks (block_chunks > 0)
        sd[k] = v
    if "pos_embed" in sd:
        sd["pos_embed"] = interpolate_pos_embed(sd["pos_embed"], model.grid)
    load_matching(model, sd, f"DINOv2 {path}", ignore=("head.",), may_miss=("proj.",))
    return model
