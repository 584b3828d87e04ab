"""Plain-tensor float64 building blocks for the reference forwards of the checkpoint-compatibility
tests (no nn.Module, no functional layers)."""

from __future__ import annotations

import math

import torch

DT = torch.float64


def ln(x, w, b, eps):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * w + b


def gelu(x):
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))


def softmax(x, dim):
    e = torch.exp(x - x.max(dim, keepdim=True).values)
    return e / e.sum(dim, keepdim=True)


def lin(x, sd, name):
    return x @ sd[f"{name}.weight"].T + sd[f"{name}.bias"]


def heads_attention(q, k, v, n_heads):
    B, N, D = q.shape
    hd = D // n_heads
    split = lambda t: t.reshape(B, N, n_heads, hd).permute(0, 2, 1, 3)  # noqa: E731
    att = softmax(split(q) @ split(k).transpose(-1, -2) / math.sqrt(hd), -1)
    return (att @ split(v)).permute(0, 2, 1, 3).reshape(B, N, D)


def r(*shape, scale=0.1, g=None):
    return torch.randn(*shape, generator=g) * scale
