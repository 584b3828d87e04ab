"""EchoingECG-compatible encoder: 1-D XResNet-101 (basic blocks) + GPO pooling, loadable from `echoingecg.pt`.

Module names follow the public `ProbXResNet1D` (`conv1`, `bn1`, `layer1..4.N.{conv1,bn1,conv2,bn2,shortcut}`,
`linear`, `gpool.{gru,linear}`), so the `ecg_encoder.*` keys of the public checkpoint load directly. Only
the mean branch is kept; the probabilistic `std_*` branch of the public model is dropped at load time.
EchoingECG was trained on 10 s at 100 Hz with a per-lead scaler: the encoder resamples its input from
`fs` to `native_fs` itself and applies the scaler held in `input_scaler` (identity until `set_scaler` /
`load_scaler`; `model.ecg_scaler` reaches it through `build_ecg_encoder`). Checkpoints are read
weights-only (`safe_torch_load`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from math import gcd
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy import signal as sps
from torch import nn

from stence.config import STANDARD_LEADS
from stence.models.base import LEAD_ORDERS, ECGEncoder, load_matching
from stence.models.catalog import create_ecg_encoder, register_ecg_encoder
from stence.models.safe_load import CheckpointError, load_scaler, safe_torch_load

RESNET101_LAYERS = (3, 4, 23, 3)


def conv1d(ni: int, nf: int, ks: int = 3, stride: int = 1) -> nn.Conv1d:
    return nn.Conv1d(ni, nf, kernel_size=ks, stride=stride, padding=ks // 2, bias=False)


class ResBlock1D(nn.Module):
    """Basic residual block: conv3-BN-ReLU-conv3-BN + (1x1 conv + BN) shortcut when shape changes."""

    def __init__(self, ni: int, nf: int, stride: int = 1):
        super().__init__()
        self.conv1 = conv1d(ni, nf, stride=stride)
        self.bn1 = nn.BatchNorm1d(nf)
        self.conv2 = conv1d(nf, nf)
        self.bn2 = nn.BatchNorm1d(nf)
        self.shortcut = nn.Sequential()
        if stride != 1 or ni != nf:
            self.shortcut = nn.Sequential(conv1d(ni, nf, ks=1, stride=stride), nn.BatchNorm1d(nf))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


def positional_encoding_1d(d_model: int, length: int) -> torch.Tensor:
    """(length, d_model) sinusoidal code: even channels sin, odd channels cos."""
    pos = torch.arange(length, dtype=torch.float32)[:, None]
    div = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float32) * -(math.log(10000.0) / d_model))
    pe = torch.zeros(length, d_model)
    pe[:, 0::2] = torch.sin(pos * div)
    pe[:, 1::2] = torch.cos(pos * div)
    return pe


class GPO(nn.Module):
    """Generalised pooling operator: a bi-GRU over a position code scores each rank; softmax(score / 0.1)
    weights the per-dimension descending-sorted features."""

    def __init__(self, d_pe: int = 32, d_hidden: int = 32):
        super().__init__()
        self.d_pe, self.d_hidden = d_pe, d_hidden
        self.gru = nn.GRU(d_pe, d_hidden, 1, batch_first=True, bidirectional=True)
        self.linear = nn.Linear(d_hidden, 1, bias=False)

    def pool_weights(self, length: int, like: torch.Tensor) -> torch.Tensor:
        """(1, length, 1) weights; they depend on the length only (every sequence here is full length)."""
        pe = positional_encoding_1d(self.d_pe, length).to(like)[None]  # (1, L, d_pe)
        out, _ = self.gru(pe)  # (1, L, 2 * d_hidden)
        out = (out[..., : self.d_hidden] + out[..., self.d_hidden :]) / 2  # mean of both directions
        return torch.softmax(self.linear(out) / 0.1, dim=1)  # (1, L, 1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(B, L, D) -> (B, D)."""
        weights = self.pool_weights(features.shape[1], features)
        ranked = features.sort(dim=1, descending=True).values  # (B, L, D), per dimension
        return (ranked * weights).sum(dim=1)


class LeadScaler(nn.Module):
    """Per-lead standardisation (x - center) / scale with the model's own statistics (identity by default)."""

    def __init__(self, n_leads: int):
        super().__init__()
        self.register_buffer("center", torch.zeros(n_leads))
        self.register_buffer("scale", torch.ones(n_leads))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.center[:, None]) / self.scale[:, None]  # (B, L, T)


class PolyphaseResample(nn.Module):
    """Anti-aliased rational resampling along time, as scipy.signal.resample_poly (Kaiser 5, zero padding)."""

    def __init__(self, fs_in: float, fs_out: float):
        super().__init__()
        if fs_in != int(fs_in) or fs_out != int(fs_out):
            raise ValueError(f"resampling needs integer rates, got {fs_in} -> {fs_out}")
        g = gcd(int(fs_in), int(fs_out))
        self.up, self.down = int(fs_out) // g, int(fs_in) // g
        max_rate = max(self.up, self.down)
        half = 10 * max_rate
        h = sps.firwin(2 * half + 1, 1.0 / max_rate, window=("kaiser", 5.0)) * self.up
        self.register_buffer(
            "taps", torch.tensor(h[::-1].copy(), dtype=torch.float32)[None, None], persistent=False
        )
        self.half = half

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, L, T = x.shape
        flat = x.reshape(B * L, 1, T)
        if self.up > 1:  # zero-stuff: (BL, 1, T) -> (BL, 1, T * up)
            flat = F.pad(flat.unsqueeze(-1), (0, self.up - 1)).reshape(B * L, 1, T * self.up)
        y = F.conv1d(flat, self.taps.to(x.dtype), padding=self.half)[..., :: self.down]
        n_out = -(-T * self.up // self.down)  # ceil, as resample_poly
        return y[..., :n_out].reshape(B, L, n_out)


def echoingecg_native(
    sig: np.ndarray,
    fs: float,
    center: np.ndarray | None = None,
    scale: np.ndarray | None = None,
    seconds: float = 10.0,
    target_fs: int = 100,
) -> np.ndarray:
    """(12, T) at `fs` -> (12, seconds * 100) float32 at 100 Hz: resample, crop/zero-pad, per-lead scale."""
    g = gcd(int(fs), target_fs)
    x = sps.resample_poly(np.asarray(sig, dtype=np.float64), target_fs // g, int(fs) // g, axis=-1)
    n = int(round(seconds * target_fs))
    x = x[:, :n] if x.shape[1] >= n else np.pad(x, ((0, 0), (0, n - x.shape[1])))
    if center is not None:
        x = x - np.asarray(center)[:, None]
    if scale is not None:
        x = x / np.maximum(np.asarray(scale), 1e-8)[:, None]
    return x.astype(np.float32)


class EchoingECGEncoder(ECGEncoder):
    """XResNet1d (basic blocks) -> Linear -> GPO -> L2-normalised (B, embed_size)."""

    def __init__(
        self,
        layers: Sequence[int] = RESNET101_LAYERS,
        init_dim: int = 96,
        factor_dim: Sequence[int] = (2, 4, 8, 16),
        embed_size: int = 512,
        gpo_dim: int = 32,
        fs: float = 100,
        n_samples: int = 1000,
        native_fs: float | None = 100,  # the input is resampled from fs to this rate; None = as is
        leads: Sequence[str] = STANDARD_LEADS,
        lead_order: str = "standard",
    ):
        super().__init__(fs, n_samples, leads, lead_order)
        n_leads = len(self.leads)
        self.init_kwargs: dict[str, Any] = dict(
            layers=list(layers),
            init_dim=init_dim,
            factor_dim=list(factor_dim),
            embed_size=embed_size,
            gpo_dim=gpo_dim,
            fs=fs,
            n_samples=n_samples,
            native_fs=native_fs,
            leads=list(self.leads),
            lead_order=lead_order,
        )
        self.embed_dim = embed_size
        self.resample = PolyphaseResample(fs, native_fs) if native_fs and native_fs != fs else nn.Identity()
        self.input_scaler = LeadScaler(n_leads)
        self.conv1 = conv1d(n_leads, init_dim, ks=7, stride=2)
        self.bn1 = nn.BatchNorm1d(init_dim)
        widths = [init_dim * f for f in factor_dim]
        in_planes = init_dim
        for i, (width, n, stride) in enumerate(zip(widths, layers, (1, 2, 2, 2), strict=True), start=1):
            blocks = []
            for s in [stride] + [1] * (n - 1):
                blocks.append(ResBlock1D(in_planes, width, s))
                in_planes = width
            setattr(self, f"layer{i}", nn.Sequential(*blocks))
        self.linear = nn.Linear(widths[-1], embed_size)
        self.gpool = GPO(gpo_dim, gpo_dim)

    def set_scaler(
        self, center: Sequence[float] | torch.Tensor, scale: Sequence[float] | torch.Tensor
    ) -> None:
        """Install the per-lead scaler (in the weights' lead order) that the public model was trained with."""
        with torch.no_grad():
            self.input_scaler.center.copy_(torch.as_tensor(center, dtype=torch.float32))
            self.input_scaler.scale.copy_(torch.as_tensor(scale, dtype=torch.float32).clamp_min(1e-8))

    def load_scaler(self, path: str) -> EchoingECGEncoder:
        """Install the scaler of a JSON/npz file (`model.ecg_scaler`), validated against the weights' leads."""
        mean, scale = load_scaler(path, n_features=len(self.leads), leads=LEAD_ORDERS[self.lead_order])
        self.set_scaler(mean, scale)
        return self

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 12, T) -> tokens (B, T_native / 16, embed_size)."""
        x = self.input_scaler(self.resample(self.to_model_order(x)))
        x = F.relu(self.bn1(self.conv1(x)))  # (B, 12, T) -> (B, init_dim, T/2)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))  # -> (B, 16 * init_dim, T/16)
        return self.linear(x.transpose(1, 2))  # -> (B, T/16, embed_size)

    def pool(self, tokens: torch.Tensor) -> torch.Tensor:
        pooled = self.gpool(tokens)  # (B, L, E) -> (B, E)
        return pooled / (pooled.pow(2).sum(dim=-1, keepdim=True).sqrt() + 1e-8)

    def load_pretrained(self, path: str) -> EchoingECGEncoder:
        return load_echoingecg_checkpoint(self, path)


@register_ecg_encoder("echoingecg")
def echoingecg(**kw: Any) -> EchoingECGEncoder:
    """XResNet1d-101, widths 192/384/768/1536, 512-d GPO embedding (public EchoingECG)."""
    return EchoingECGEncoder(**kw)


@register_ecg_encoder("echoingecg_tiny")
def echoingecg_tiny(**kw: Any) -> EchoingECGEncoder:
    """CPU preset: one block per stage, widths 16/32/64/128, 32-d embedding."""
    return EchoingECGEncoder(**{"layers": (1, 1, 1, 1), "init_dim": 8, "embed_size": 32, "gpo_dim": 8, **kw})


def load_echoingecg_checkpoint(
    model_or_name: EchoingECGEncoder | str | None, path: str, **overrides: Any
) -> EchoingECGEncoder:
    """Load `echoingecg.pt` (keys `ecg_encoder.*`; text and std branches ignored) or a bare encoder state.

    Read weights-only; the checkpoint records no sampling rate or window (the encoder resamples to its
    `native_fs`), so the contract check is the lead count: the stem's input channels against the leads.
    """
    raw = safe_torch_load(path, "EchoingECG checkpoint")
    raw = raw.get("state_dict", raw) if isinstance(raw, dict) else raw
    if not isinstance(raw, dict):
        raise CheckpointError(
            f"EchoingECG checkpoint {path}: expected a state dict, got {type(raw).__name__}"
        )
    prefixed = any(k.startswith("ecg_encoder.") for k in raw)
    sd = {
        k.removeprefix("ecg_encoder."): v
        for k, v in raw.items()
        if k.startswith("ecg_encoder.") or not prefixed
    }
    sd = {k: v for k, v in sd.items() if not k.startswith(("std_linear.", "std_gpool."))}
    if not isinstance(sd.get("conv1.weight"), torch.Tensor):
        raise CheckpointError(f"EchoingECG checkpoint {path}: no conv1.weight tensor (ecg_encoder.* keys)")
    n_leads = len(overrides.get("leads", getattr(model_or_name, "leads", STANDARD_LEADS)))
    if sd["conv1.weight"].shape[1] != n_leads:
        raise CheckpointError(
            f"EchoingECG checkpoint {path} does not fit the input contract: its stem takes "
            f"{sd['conv1.weight'].shape[1]} leads, the encoder feeds {n_leads} (data.leads)"
        )
    init_dim = sd["conv1.weight"].shape[0]
    layers = [len({m.group(1) for k in sd if (m := re.match(rf"layer{i}\.(\d+)\.", k))}) for i in range(1, 5)]
    derived = {
        "init_dim": init_dim,
        "layers": layers,
        "factor_dim": [sd[f"layer{i}.0.conv1.weight"].shape[0] // init_dim for i in range(1, 5)],
        "embed_size": sd["linear.weight"].shape[0],
        "gpo_dim": sd["gpool.gru.weight_ih_l0"].shape[1],
    }
    if isinstance(model_or_name, EchoingECGEncoder):
        base, arch = {**model_or_name.init_kwargs, **overrides}, dict(model_or_name.arch)
    elif isinstance(model_or_name, str):
        probe = create_ecg_encoder(model_or_name, **{**overrides, **derived})
        base, arch = dict(probe.init_kwargs), dict(probe.arch)
    else:
        base, arch = dict(overrides), {"name": "echoingecg", "overrides": {}}
    model = EchoingECGEncoder(**{**base, **derived})
    model.arch = {"name": arch["name"], "overrides": {**arch.get("overrides", {}), **derived}}
    load_matching(model, sd, f"EchoingECG {path}", may_miss=("input_scaler.",))
    return model
