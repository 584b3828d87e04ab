"""OTIS-compatible ViT ECG encoder: the module tree of the public OTIS checkpoints, and their loader.

Tokens: a (1, 24) patch per lead and step -> grid 12 x floor(T/24), flattened lead-major, after a CLS
token. Positions: a learned lead table (first D/2 channels, row = 1 + domain offset + lead, row 0 is the
padding row) and a fixed sin-cos time table (last D/2 channels, row 0 belongs to the CLS token and is
zero). The public attention is Linear `qkv` -> `nn.MultiheadAttention` (with its own in/out projections)
-> Linear `proj`; the same weights are kept here, so checkpoints load key for key.

`load_otis_checkpoint` loads a public OTIS checkpoint into `OTISEncoder`: the encoder is shaped like the
checkpoint (time and lead tables, MLP kind, width and depth), pretraining-only parts are ignored.

The file is read weights-only (`safe_torch_load`, argparse.Namespace allowed for `args`), and what the
checkpoint says about its ECG domain is checked against the encoder's input contract (`_check_contract`).
What a public checkpoint records, and what is used (the golden OTIS-base file, upstream `main_pretrain.py`):

- `domains[domain]` = (input_channels, variates, time_steps), the shape the pretraining data had, e.g. ecg
  (1, 12, 2400). Checked: channels must be 1 (the patch embedding is a 1-channel Conv2d), variates must equal
  the encoder's leads (each lead has its own lead-table row), and time_steps against `n_samples`
  (`data.fs` x `data.window_s`). Upstream fine-tuning takes any length: shorter inputs use the first rows of
  the time table, longer ones get it interpolated (`main_finetune.py` does the same), so a longer window only
  warns (ContractWarning); a window shorter than one patch is refused.
- `args.time_steps` / `args.input_channels` / `args.input_variates`: the same facts, used when `domains` is
  absent; `args.patch_size` / `args.patch_width` must agree with the patch embedding's kernel.
- Not used: `args.input_size` (a parser default that pretraining does not read: (1, 12, 5000) in the golden
  file beside time_steps 2400) and the other training options. No sampling rate is recorded anywhere in an
  OTIS checkpoint, so `data.fs` cannot be checked against it: the rate is the user's responsibility.
"""

from __future__ import annotations

import argparse
import inspect
import re
import warnings
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from stence.config import STANDARD_LEADS
from stence.models.base import DropPath, ECGEncoder, load_matching
from stence.models.catalog import create_ecg_encoder, register_ecg_encoder
from stence.models.safe_load import CheckpointError, ContractWarning, safe_torch_load

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


# ---------------------------------------------------------------------------------------------------
# loader of the public OTIS checkpoints (see the module docstring)

# pretraining-only parts (decoder, projector/predictor, top-level MLP head) and fine-tuning heads
_IGNORED_PREFIXES = (
    "head.",
    "fc_norm.",
    "decoder",
    "mask_token",
    "projector.",
    "predictor.",
    "mlp.",
    "mlp_",
    "attention_pool.",
    "pos_embed.",
)


def interpolate_time_table(table: torch.Tensor, n: int) -> torch.Tensor:
    """(1, 1 + m, C) -> (1, 1 + n, C): rows 1.. linearly resampled (align_corners=False), CLS row kept."""
    rows = table[:, 1:].permute(0, 2, 1)  # (1, C, m)
    rows = F.interpolate(rows, size=n, mode="linear", align_corners=False).permute(0, 2, 1)  # (1, n, C)
    return torch.cat([table[:, :1], rows], dim=1)


def _read_otis(path: str) -> dict[str, Any]:
    # weights-only: the one class beyond tensors the public format pickles ("args") is allowed by name
    ckpt = safe_torch_load(path, "OTIS checkpoint")
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("model"), dict):
        raise CheckpointError(f"{path}: not an OTIS checkpoint (expected a dict with 'model')")
    return ckpt


def _recorded_shape(ckpt: dict[str, Any], domain: str) -> tuple[int | None, int | None, int | None]:
    """(channels, variates, time_steps) of the checkpoint's `domain` data, from `domains`, else from `args`."""
    shape = (ckpt.get("domains") or {}).get(domain)
    if shape is not None and len(tuple(shape)) == 3:
        return tuple(int(n) for n in shape)  # type: ignore[return-value]
    args = ckpt.get("args")
    if not isinstance(args, argparse.Namespace):
        return None, None, None
    get = lambda key: int(v) if isinstance(v := getattr(args, key, None), int) else None  # noqa: E731
    return get("input_channels"), get("input_variates"), get("time_steps")


def _check_contract(
    ckpt: dict[str, Any], sd: dict[str, torch.Tensor], kwargs: dict[str, Any], domain: str, path: str
) -> None:
    """The checkpoint's recorded `domain` shape and patching against the encoder's input (module docstring)."""
    n_leads, n_samples, fs = len(kwargs.get("leads", STANDARD_LEADS)), int(kwargs["n_samples"]), kwargs["fs"]
    _out, in_ch, height, width = sd["patch_embed.proj.weight"].shape
    channels, variates, time_steps = _recorded_shape(ckpt, domain)
    wrong = []
    if in_ch != 1 or height != 1:
        wrong.append(
            f"its patch kernel is ({in_ch}, {height}, {width}), the encoder takes 1-channel (1, w) patches"
        )
    if channels is not None and channels != 1:
        wrong.append(f"its {domain} domain has {channels} input channels, the encoder takes 1")
    if variates is not None and variates != n_leads:
        wrong.append(
            f"its {domain} domain has {variates} variates, the encoder feeds {n_leads} leads (data.leads)"
        )
    args = ckpt.get("args")
    if isinstance(args, argparse.Namespace):
        patch = getattr(args, "patch_size", None) or (1, getattr(args, "patch_width", width))
        if tuple(patch)[-1] != width:
            wrong.append(f"args.patch_size {tuple(patch)} disagrees with its patch kernel width {width}")
    if n_samples < width:
        wrong.append(
            f"the window of {n_samples} samples is shorter than one {width}-sample patch "
            f"(set data.window_s so that data.fs x data.window_s >= {width})"
        )
    if wrong:
        raise CheckpointError(f"OTIS checkpoint {path} does not fit the input contract: " + "; ".join(wrong))
    n_patches = n_samples // width
    if time_steps is not None and n_patches > time_steps // width:
        table = sd["pos_embed_x"].shape[1] - 1 if "pos_embed_x" in sd else n_patches
        how = (
            f"its time table is interpolated from {table} to {n_patches} patches"
            if table < n_patches
            else (f"its time table covers {table} patches")
        )
        warnings.warn(
            f"OTIS checkpoint {path} was pretrained on {time_steps}-sample {domain} windows; the encoder takes "
            f"{n_samples} samples ({n_samples / fs:g} s at {fs:g} Hz): {how}, as upstream fine-tuning allows; "
            f"set data.window_s <= {time_steps / fs:g} to stay within the pretraining length",
            ContractWarning,
            stacklevel=3,
        )


def _size_from_args(args: Any, embed_dim: int) -> dict[str, int]:
    name = getattr(args, "model", "") if isinstance(args, argparse.Namespace) else ""
    for size in ("base", "large", "huge"):
        if size in str(name) and OTIS_SIZES[size]["embed_dim"] == embed_dim:
            return OTIS_SIZES[size]
    for size in OTIS_SIZES.values():
        if size["embed_dim"] == embed_dim:
            return size
    raise ValueError(f"no OTIS size with embed_dim {embed_dim}; pass a model with the right num_heads")


def _arch_from_state(sd: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Width, depth, patch width and MLP kind as the checkpoint's tensors say."""
    derived: dict[str, Any] = {
        "embed_dim": sd["cls_token"].shape[-1],
        "depth": len({m.group(1) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))}),
        "patch_width": sd["patch_embed.proj.weight"].shape[-1],
    }
    if "blocks.0.mlp.fc1_g.weight" in sd:  # newer OTIS checkpoints: SwiGLU
        hidden, norm = sd["blocks.0.mlp.fc1_g.weight"].shape[0], "blocks.0.mlp.norm.weight" in sd
        return {**derived, "mlp": "swiglu", "mlp_hidden": hidden, "mlp_norm": norm}
    return {**derived, "mlp": "gelu", "mlp_hidden": sd["blocks.0.mlp.fc1.weight"].shape[0], "mlp_norm": False}


def _starting_point(
    model_or_name: OTISEncoder | str | None,
    ckpt: dict[str, Any],
    derived: dict[str, Any],
    overrides: dict[str, Any],
    path: str,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Constructor kwargs and registry arch before the checkpoint's shapes are applied."""
    if isinstance(model_or_name, OTISEncoder):
        kwargs = {**model_or_name.init_kwargs, **overrides}
        for key in ("embed_dim", "depth"):
            if kwargs[key] != derived[key]:
                raise ValueError(f"{path}: checkpoint {key} {derived[key]} != encoder {key} {kwargs[key]}")
        arch = model_or_name.arch
        return kwargs, {"name": arch["name"], "overrides": {**arch.get("overrides", {}), **overrides}}
    if isinstance(model_or_name, str):
        probe = create_ecg_encoder(model_or_name, **overrides)
        return dict(probe.init_kwargs), dict(probe.arch)
    size = _size_from_args(ckpt.get("args"), derived["embed_dim"])
    name = "otis_" + next(k for k, v in OTIS_SIZES.items() if v == size)
    defaults = {k: p.default for k, p in inspect.signature(OTISEncoder).parameters.items()}
    return {**defaults, **size, **overrides}, {"name": name, "overrides": dict(overrides)}


def _fit_tables(
    sd: dict[str, torch.Tensor], ckpt: dict[str, Any], kwargs: dict[str, Any], domain: str, path: str
) -> None:
    """Time table (interpolated if the window is longer) and lead table + domain offset from the checkpoint."""
    want_rows = kwargs["n_samples"] // kwargs["patch_width"]
    if "pos_embed_x" in sd:
        if sd["pos_embed_x"].shape[1] - 1 < want_rows:
            sd["pos_embed_x"] = interpolate_time_table(sd["pos_embed_x"], want_rows)
        kwargs["time_rows"] = sd["pos_embed_x"].shape[1] - 1
    if "pos_embed_y.weight" not in sd:
        return
    offsets = dict(ckpt.get("domain_offsets") or {})
    if domain in offsets:
        offset = int(offsets[domain])
    elif len(offsets) > 1 and sum(offsets.values()) == 0:
        offset = 0  # domain-agnostic lead table
    else:
        raise CheckpointError(f"{path}: no {domain!r} domain in checkpoint domains {sorted(offsets)}")
    kwargs["lead_rows"] = sd["pos_embed_y.weight"].shape[0]
    kwargs["domain_offset"] = offset


_SHAPE_KEYS = (
    "embed_dim",
    "depth",
    "mlp",
    "mlp_hidden",
    "mlp_norm",
    "patch_width",
    "lead_rows",
    "domain_offset",
    "time_rows",
)


def load_otis_checkpoint(
    model_or_name: OTISEncoder | str | None, path: str, domain: str = "ecg", **overrides: Any
) -> OTISEncoder:
    """Load a public OTIS checkpoint; return an encoder shaped like it (time/lead tables, MLP kind).

    `model_or_name`: an encoder (its settings are kept, tables and MLP follow the checkpoint), a registry
    name (built with `overrides`), or None (size inferred from the checkpoint's args and width). The file is
    read weights-only and its `domain` shape checked against the encoder's leads and window (module
    docstring); CheckpointError says what differs.
    """
    ckpt = _read_otis(path)
    sd = {re.sub(r"^module\.", "", k): v for k, v in ckpt["model"].items()}
    derived = _arch_from_state(sd)
    kwargs, arch = _starting_point(model_or_name, ckpt, derived, overrides, path)
    kwargs.update(derived)
    _check_contract(ckpt, sd, kwargs, domain, path)
    _fit_tables(sd, ckpt, kwargs, domain, path)
    model = OTISEncoder(**kwargs)
    shapes = {k: kwargs[k] for k in _SHAPE_KEYS if k in kwargs}
    model.arch = {"name": arch["name"], "overrides": {**arch.get("overrides", {}), **shapes}}
    load_matching(
        model,
        sd,
        f"OTIS {path}",
        ignore=_IGNORED_PREFIXES,
        may_miss=("head.", "fc_norm.", "pos_embed_x", "pos_embed_y."),
    )
    return model
