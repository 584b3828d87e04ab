"""OTIS-compatible ViT ECG encoder: the module tree of the public OTIS checkpoints (loader: otis_checkpoint).

Tokens: a (1, 24) patch per lead and step -> grid 12 x floor(T/24), flattened lead-major, after a CLS
token. Positions: a learned lead table (first D/2 channels, row = 1 + domain offset + lead, row 0 is the
padding row) and a fixed sin-cos time table (last D/2 channels, row 0 belongs to the CLS token and is
zero). The public attention is Linear `qkv` -> `nn.MultiheadAttention` (with its own in/out projections)
-> Linear `proj`; the same weights are kept here, so checkpoints load key for key.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from stence.config import STANDARD_LEADS
from stence.models.base import DropPath, ECGEncoder
from stence.models.registry import register_ecg_encoder

OTIS_SIZES: dict[str, dict[str, int]] = {
    "tiny": {"embed_dim": 64, "depth": 2, "num_heads": 2},
    "base": {"embed_dim": 192, "depth": 12, "num_heads": 3},
    "large": {"embed_dim": 384, "depth": 18, "num_heads": 6},
    "huge": {"embed_dim": 576, "depth": 24, "num_heads": 8},
}
ATTN_IMPLS = ("fused", "sdpa", "mha")


def sincos_table(dim: int, n: int) -> torch.Tensor:
    """Fixed 1-D sin-cos table (1 + n, dim); row 0 (CLS) is zero, rows 1.. encode positions 0..n-1."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))  # (dim/2,)
    out = torch.arange(n, dtype=torch.float64)[:, None] * omega[None]  # (n, dim/2)
    table = torch.cat([out.sin(), out.cos()], dim=1)  # (n, dim)
    return torch.cat([torch.zeros(1, dim, dtype=torch.float64), table]).float()


class PatchEmbed(nn.Module):
    """Conv2d(1 -> D, (1, w)) then LayerNorm and GELU per token: (B, 1, L, T) -> (B, L, T', D)."""

    def __init__(self, embed_dim: int, patch_width: int):
        super().__init__()
        self.proj = nn.Conv2d(1, embed_dim, kernel_size=(1, patch_width), stride=(1, patch_width))
        self.norm = nn.LayerNorm(embed_dim)  # eps 1e-5, as the public PatchEmbed
        self.act_ft = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x).permute(0, 2, 3, 1)  # (B, 1, L, T) -> (B, L, T', D)
        return self.act_ft(self.norm(x))


class OtisAttention(nn.Module):
    """qkv Linear -> multi-head attention with in/out projections -> proj Linear (public key layout).

    `impl` chooses how the same weights are computed: "mha" calls nn.MultiheadAttention as the public
    code does (need_weights=False); "sdpa" applies the in-projections by hand and calls
    scaled_dot_product_attention; "fused" (default) multiplies the stacked linear maps out first
    (W_in_q @ W_q etc., W_proj @ W_out), which is exact algebra and halves the projection matmuls.
    """

    def __init__(self, dim: int, num_heads: int, impl: str = "fused"):
        super().__init__()
        if impl not in ATTN_IMPLS:
            raise ValueError(f"unknown attention impl {impl!r}; valid: {list(ATTN_IMPLS)}")
        self.num_heads = num_heads
        self.impl = impl
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.mha = nn.MultiheadAttention(dim, num_heads, batch_first=True)
        self.proj = nn.Linear(dim, dim)

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        B, N, D = t.shape
        return t.view(B, N, self.num_heads, D // self.num_heads).transpose(1, 2)  # (B, H, N, hd)

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        B, N, D = q.shape
        a = F.scaled_dot_product_attention(self._heads(q), self._heads(k), self._heads(v))  # (B, H, N, hd)
        return a.transpose(1, 2).reshape(B, N, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.impl == "mha":
            q, k, v = self.qkv(x).chunk(3, dim=-1)  # (B, N, 3D) -> 3 x (B, N, D)
            return self.proj(self.mha(q, k, v, need_weights=False)[0])
        w_in, b_in = self.mha.in_proj_weight, self.mha.in_proj_bias  # (3D, D), (3D,)
        w_out, b_out = self.mha.out_proj.weight, self.mha.out_proj.bias
        if self.impl == "sdpa":
            qkv = self.qkv(x)  # (B, N, 3D)
            q, k, v = (
                F.linear(t, w, b)
                for t, w, b in zip(qkv.chunk(3, -1), w_in.chunk(3), b_in.chunk(3), strict=True)
            )
            return self.proj(F.linear(self._attend(q, k, v), w_out, b_out))
        # fused: in_s(qkv_s(x)) = (W_in_s W_s) x + (W_in_s b_s + b_in_s) for s in q, k, v
        D = x.shape[-1]
        w_qkv, b_qkv = self.qkv.weight.view(3, D, D), self.qkv.bias.view(3, D, 1)
        w_in3, b_in3 = w_in.view(3, D, D), b_in.view(3, D)
        w = torch.bmm(w_in3, w_qkv).reshape(3 * D, D)  # (3D, D)
        b = (torch.bmm(w_in3, b_qkv).squeeze(-1) + b_in3).reshape(3 * D)  # (3D,)
        q, k, v = F.linear(x, w, b).chunk(3, dim=-1)
        w_o = self.proj.weight @ w_out  # (D, D)
        b_o = self.proj.weight @ b_out + self.proj.bias
        return F.linear(self._attend(q, k, v), w_o, b_o)


class Mlp(nn.Module):
    """fc1 -> GELU -> fc2 (timm Mlp keys)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class SwiGLU(nn.Module):
    """SiLU(fc1_g x) * fc1_x x -> (optional LayerNorm) -> fc2 (timm SwiGLU keys, newer OTIS checkpoints)."""

    def __init__(self, dim: int, hidden: int, norm: bool = False):
        super().__init__()
        self.fc1_g = nn.Linear(dim, hidden)
        self.fc1_x = nn.Linear(dim, hidden)
        self.act = nn.SiLU()
        self.norm = nn.LayerNorm(hidden) if norm else nn.Identity()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.norm(self.act(self.fc1_g(x)) * self.fc1_x(x)))


class Block(nn.Module):
    """Pre-norm transformer block (LayerNorm eps 1e-6) with stochastic depth."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        hidden: int,
        mlp: str,
        mlp_norm: bool,
        drop_path: float,
        attn_impl: str,
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = OtisAttention(dim, num_heads, attn_impl)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = SwiGLU(dim, hidden, mlp_norm) if mlp == "swiglu" else Mlp(dim, hidden)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class OTISEncoder(ECGEncoder):
    """OTIS ViT over a 12 x floor(T/24) patch grid; the embedding is the normalised CLS token."""

    def __init__(
        self,
        embed_dim: int = 192,
        depth: int = 12,
        num_heads: int = 3,
        mlp_ratio: float = 4.0,
        mlp: str = "gelu",  # "gelu" or "swiglu"
        mlp_hidden: int | None = None,  # hidden width; default embed_dim * mlp_ratio
        mlp_norm: bool = False,  # SwiGLU with a LayerNorm on the hidden layer
        patch_width: int = 24,
        fs: float = 500,
        n_samples: int = 1500,
        leads: Sequence[str] = STANDARD_LEADS,
        lead_order: str = "standard",
        lead_rows: int | None = None,  # rows of the lead table (1 + all variates of all domains)
        domain_offset: int = 0,  # the ECG domain's first row - 1 in the lead table
        time_rows: int | None = None,  # patches covered by the time table; default floor(n_samples / 24)
        drop_path: float = 0.1,
        attn_impl: str = "fused",
    ):
        super().__init__(fs, n_samples, leads, lead_order)
        if embed_dim % 2 or embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} must be even and divisible by num_heads {num_heads}")
        if mlp not in ("gelu", "swiglu"):
            raise ValueError(f"mlp must be 'gelu' or 'swiglu', got {mlp!r}")
        n_leads = len(self.leads)
        lead_rows = lead_rows or 1 + n_leads
        time_rows = time_rows or n_samples // patch_width
        if 1 + domain_offset + n_leads > lead_rows:
            raise ValueError(
                f"lead table of {lead_rows} rows cannot hold offset {domain_offset} + {n_leads} leads"
            )
        hidden = mlp_hidden or int(embed_dim * mlp_ratio)
        self.init_kwargs: dict[str, Any] = dict(
            embed_dim=embed_dim,
            depth=depth,
            num_heads=num_heads,
            mlp_ratio=mlp_ratio,
            mlp=mlp,
            mlp_hidden=hidden,
            mlp_norm=mlp_norm,
            patch_width=patch_width,
            fs=fs,
            n_samples=n_samples,
            leads=list(self.leads),
            lead_order=lead_order,
            lead_rows=lead_rows,
            domain_offset=domain_offset,
            time_rows=time_rows,
            drop_path=drop_path,
            attn_impl=attn_impl,
        )
        self.embed_dim = embed_dim
        self.patch_width = patch_width
        self.patch_embed = PatchEmbed(embed_dim, patch_width)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.register_buffer("pos_embed_x", sincos_table(embed_dim // 2, time_rows)[None])  # (1, 1+T', D/2)
        self.pos_embed_y = nn.Embedding(lead_rows, embed_dim // 2, padding_idx=0)
        self.register_buffer("lead_ids", 1 + domain_offset + torch.arange(n_leads), persistent=False)
        rates = torch.linspace(0, drop_path, depth).tolist()  # stochastic depth decay rule
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, hidden, mlp, mlp_norm, r, attn_impl) for r in rates
        )
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self._init_weights()

    def _init_weights(self) -> None:
        nn.init.normal_(self.cls_token, std=0.02)
        with torch.no_grad():
            nn.init.trunc_normal_(self.pos_embed_y.weight[1:], std=0.02)
            self.pos_embed_y.weight[0].zero_()
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def set_attn_impl(self, impl: str) -> None:
        """Switch how attention is computed (same weights, same maths)."""
        if impl not in ATTN_IMPLS:
            raise ValueError(f"unknown attention impl {impl!r}; valid: {list(ATTN_IMPLS)}")
        for blk in self.blocks:
            blk.attn.impl = impl
        self.init_kwargs["attn_impl"] = impl

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 12, T) -> tokens (B, 1 + 12 * floor(T/24), D) after the final norm; token 0 is CLS."""
        x = self.to_model_order(x)
        n_t = x.shape[-1] // self.patch_width
        if n_t > self.pos_embed_x.shape[1] - 1:
            raise ValueError(
                f"input of {x.shape[-1]} samples gives {n_t} patches but the time table covers "
                f"{self.pos_embed_x.shape[1] - 1}; build the encoder with a larger n_samples"
            )
        x = self.patch_embed(x.unsqueeze(1))  # (B, 12, T) -> (B, 12, T', D)
        B, L, _, D = x.shape
        lead = self.pos_embed_y(self.lead_ids)[:, None, :].expand(L, n_t, D // 2)  # (12, T', D/2)
        time = self.pos_embed_x[0, 1 : n_t + 1][None].expand(L, n_t, D // 2)  # (12, T', D/2)
        x = (x + torch.cat([lead, time], dim=-1)).flatten(1, 2)  # (B, 12 * T', D), lead-major
        cls_pos = torch.cat([self.pos_embed_x.new_zeros(D // 2), self.pos_embed_x[0, 0]])  # (D,)
        cls = (self.cls_token + cls_pos).expand(B, 1, D)
        x = torch.cat([cls, x], dim=1)  # (B, 1 + N, D)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)

    def pool(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens[:, 0]  # (B, 1 + N, D) -> (B, D)

    def load_pretrained(self, path: str) -> OTISEncoder:
        from stence.models.otis_checkpoint import load_otis_checkpoint

        return load_otis_checkpoint(self, path)


def _make(size: str, **kw: Any) -> OTISEncoder:
    return OTISEncoder(**{**OTIS_SIZES[size], **kw})


@register_ecg_encoder("otis_tiny")
def otis_tiny(**kw: Any) -> OTISEncoder:
    """CPU preset for the demo and tests: D 64, depth 2, 2 heads."""
    return _make("tiny", **kw)


@register_ecg_encoder("otis_base")
def otis_base(**kw: Any) -> OTISEncoder:
    """D 192, depth 12, 3 heads (7.1 M parameters)."""
    return _make("base", **kw)


@register_ecg_encoder("otis_large")
def otis_large(**kw: Any) -> OTISEncoder:
    return _make("large", **kw)


@register_ecg_encoder("otis_huge")
def otis_huge(**kw: Any) -> OTISEncoder:
    return _make("huge", **kw)
