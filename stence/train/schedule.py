"""Per-step learning-rate schedule and weight-decay parameter groups shared by every training stage."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

# Parameter names containing one of these never get weight decay (besides every 0-d/1-d tensor).
NO_DECAY_NAME_PARTS: tuple[str, ...] = (
    "bias",
    "norm",
    "embed",
    "token",
    "temperature",
    "logit_scale",
)
NO_DECAY_MODULES: tuple[type[nn.Module], ...] = (
    nn.Embedding,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.modules.batchnorm._BatchNorm,
    nn.modules.instancenorm._InstanceNorm,
)


class _WarmupCosineFactor:
    """lr factor of one param group: linear warm-up from `start_factor`, then cosine down to min_lr.

    A callable object rather than a closure so that LambdaLR.state_dict() stores its settings.
    """

    def __init__(self, warmup_steps: int, total_steps: int, start_factor: float, min_ratio: float):
        self.warmup_steps = int(warmup_steps)
        self.total_steps = int(total_steps)
        self.start_factor = float(start_factor)
        self.min_ratio = float(min_ratio)

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.start_factor + (1.0 - self.start_factor) * step / self.warmup_steps
        span = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, max(0.0, (step - self.warmup_steps) / span))
        cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
        return self.min_ratio + (1.0 - self.min_ratio) * cosine


def warmup_cosine(
    optimizer: torch.optim.Optimizer,
    warmup_steps: int,
    total_steps: int,
    start_factor: float = 1e-3,
    min_lr: float = 1e-6,
) -> LambdaLR:
    """Per-step scheduler (call `.step()` after every optimizer step): linear warm-up from
    start_factor x lr to lr over `warmup_steps`, then cosine decay to `min_lr` at `total_steps`.

    Each param group keeps its own base lr (ECG and angiography towers may differ); a group whose base
    lr is below min_lr stays at its base lr. `state_dict()`/`load_state_dict()` round-trip the step.
    """
    if total_steps < 1 or warmup_steps < 0:
        raise ValueError(f"need total_steps >= 1 and warmup_steps >= 0, got {total_steps}, {warmup_steps}")
    factors = []
    for group in optimizer.param_groups:
        base = group.get("initial_lr", group["lr"])
        min_ratio = min(1.0, min_lr / base) if base > 0 else 1.0
        factors.append(_WarmupCosineFactor(warmup_steps, total_steps, start_factor, min_ratio))
    return LambdaLR(optimizer, lr_lambda=factors)


def _no_weight_decay_names(module: nn.Module) -> set[str]:
    fn = getattr(module, "no_weight_decay", None)
    return set(fn()) if callable(fn) else set()


def param_groups(module: nn.Module, lr: float, weight_decay: float) -> list[dict[str, Any]]:
    """Two optimizer groups: decayed weight matrices, and a zero-decay group holding norms, biases,
    embeddings, tokens, temperature / logit_scale, every scalar or vector parameter, and anything
    `module.no_weight_decay()` names. Frozen parameters are left out. Works on DDP-wrapped modules.
    """
    inner = module.module if isinstance(module, nn.parallel.DistributedDataParallel) else module
    explicit = _no_weight_decay_names(inner)
    by_module: set[int] = set()
    for name, sub in inner.named_modules():
        explicit |= {f"{name}.{n}" if name else n for n in _no_weight_decay_names(sub) if sub is not inner}
        if isinstance(sub, NO_DECAY_MODULES):
            by_module |= {id(p) for p in sub.parameters(recurse=False)}

    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for name, p in inner.named_parameters():
        if not p.requires_grad:
            continue
        lowered = name.lower()
        if (
            p.ndim <= 1
            or id(p) in by_module
            or name in explicit
            or any(part in lowered for part in NO_DECAY_NAME_PARTS)
        ):
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [
        {"params": decay, "lr": lr, "weight_decay": weight_decay, "name": "decay"},
        {"params": no_decay, "lr": lr, "weight_decay": 0.0, "name": "no_decay"},
    ]
    return [g for g in groups if g["params"]]


__all__ = ["NO_DECAY_MODULES", "NO_DECAY_NAME_PARTS", "param_groups", "warmup_cosine"]
