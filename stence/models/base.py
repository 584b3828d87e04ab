"""The API every ECG encoder shares, so probing, fine-tuning and checkpoints stay thin wrappers.

Input is (B, n_leads, T) float32 with leads in `input_spec["leads"]` order (the platform's standard order
unless the encoder was built with another `leads`). `lead_order` names the order the encoder's weights
were trained with ("mimic": aVF before aVL, as MIMIC-IV-ECG stores them); the encoder permutes its input
into that order itself, so callers never reorder leads.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from stence.config import STANDARD_LEADS
from stence.data.contract import InputContract, project_contract

MIMIC_LEADS: tuple[str, ...] = ("I", "II", "III", "aVR", "aVF", "aVL", "V1", "V2", "V3", "V4", "V5", "V6")
LEAD_ORDERS: dict[str, tuple[str, ...]] = {"standard": STANDARD_LEADS, "mimic": MIMIC_LEADS}

# Parameter-name fragments that never get weight decay besides biases and norm weights (all 1-D).
_NO_DECAY_FRAGMENTS = ("cls_token", "pos_embed", "mask_token", "queries", "logit_scale", "lead_embed")


def lead_permutation(leads: Sequence[str], lead_order: str) -> list[int]:
    """Indices that take an input in `leads` order to the encoder's internal `lead_order`."""
    if lead_order not in LEAD_ORDERS:
        raise ValueError(f"unknown lead_order {lead_order!r}; valid: {sorted(LEAD_ORDERS)}")
    target = LEAD_ORDERS[lead_order]
    pos = {name.lower(): i for i, name in enumerate(leads)}
    missing = [name for name in target if name.lower() not in pos]
    if missing or len(leads) != len(target):
        raise ValueError(f"leads {list(leads)} do not match the {lead_order} set {list(target)}")
    return [pos[name.lower()] for name in target]


def no_weight_decay_names(module: nn.Module, prefix: str = "") -> set[str]:
    """Names of parameters excluded from weight decay: biases, norm/scale vectors, embeddings, tokens."""
    tables = {f"{n}.weight" for n, m in module.named_modules() if isinstance(m, nn.Embedding)}
    out: set[str] = set()
    for name, p in module.named_parameters():
        if p.ndim <= 1 or name in tables or any(f in name for f in _NO_DECAY_FRAGMENTS):
            out.add(prefix + name)
    return out


class ECGEncoder(nn.Module):
    """Base class: subclasses build their modules and implement `forward_features` and `pool`.

    Attributes every encoder sets: `embed_dim` (pooled width), `input_spec` ({fs, n_samples, leads,
    lead_order}), and `arch` ({"name", "overrides"}, filled by the registry so a checkpoint can rebuild it).
    """

    embed_dim: int

    def __init__(self, fs: float, n_samples: int, leads: Sequence[str], lead_order: str):
        super().__init__()
        self.fs = float(fs)
        self.n_samples = int(n_samples)
        self.leads = tuple(leads)
        self.lead_order = lead_order
        perm = lead_permutation(self.leads, lead_order)
        self.needs_permute = perm != list(range(len(perm)))
        self.register_buffer("lead_index", torch.tensor(perm, dtype=torch.long), persistent=False)
        self.arch: dict[str, Any] = {"name": type(self).__name__, "overrides": {}}
        self.frozen = False
        self._contract: InputContract | None = None

    @property
    def contract(self) -> InputContract:
        """The input contract (stence/data/contract.py); the project contract of the encoder's rate and window
        with default settings until `set_contract` installs another."""
        if self._contract is None:
            return project_contract({"fs": self.fs, "window_s": self.n_samples / self.fs, "leads": self.leads})
        return self._contract

    def set_contract(self, contract: InputContract | dict[str, Any]) -> ECGEncoder:
        """Declare the input contract; it must match the encoder's rate, window and leads. Recorded in
        `arch["overrides"]` so every checkpoint rebuilt from the architecture gets it back."""
        c = contract if isinstance(contract, InputContract) else InputContract.from_dict(dict(contract))
        mine = (self.fs, self.n_samples, tuple(x.lower() for x in self.leads))
        theirs = (c.fs, c.n_samples, tuple(x.lower() for x in c.leads))
        if mine != theirs:
            raise ValueError(
                f"input contract {c.kind!r} ({c.fs:g} Hz, {c.n_samples} samples, leads {list(c.leads)}) does not "
                f"match the encoder ({self.fs:g} Hz, {self.n_samples} samples, leads {list(self.leads)})"
            )
        self._contract = c
        self.arch = {**self.arch, "overrides": {**self.arch.get("overrides", {}), "contract": c.to_dict()}}
        return self

    @property
    def input_spec(self) -> dict[str, Any]:
        """What the encoder expects: sampling rate, window length, input lead order, weight lead order and the
        whole input contract."""
        return {
            "fs": self.fs,
            "n_samples": self.n_samples,
            "leads": list(self.leads),
            "lead_order": self.lead_order,
            "contract": self.contract.to_dict(),
        }

    def to_model_order(self, x: torch.Tensor) -> torch.Tensor:
        """(B, L, T) in input order -> (B, L, T) in the order the weights were trained with."""
        if x.ndim != 3 or x.shape[1] != len(self.leads):
            raise ValueError(f"expected (B, {len(self.leads)}, T) input, got {tuple(x.shape)}")
        return x.index_select(1, self.lead_index) if self.needs_permute else x

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, L, T) -> tokens (B, N, D)."""
        raise NotImplementedError

    def pool(self, tokens: torch.Tensor) -> torch.Tensor:
        """Tokens (B, N, D) -> pooled embedding (B, embed_dim)."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, L, T) -> (B, embed_dim)."""
        return self.pool(self.forward_features(x))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Alias of forward, for call sites that read better with it."""
        return self(x)

    def freeze(self) -> ECGEncoder:
        """Make every parameter non-trainable (linear probe, frozen tower)."""
        for p in self.parameters():
            p.requires_grad_(False)
        self.frozen = True
        return self

    def unfreeze(self) -> ECGEncoder:
        for p in self.parameters():
            p.requires_grad_(True)
        self.frozen = False
        return self

    def no_weight_decay(self) -> set[str]:
        """Parameter names without weight decay: norms, biases, embeddings, class token."""
        return no_weight_decay_names(self)

    def load_pretrained(self, path: str) -> ECGEncoder:
        """Load public pretrained weights of this family; may return a rebuilt encoder."""
        raise NotImplementedError(f"{type(self).__name__} has no pretrained-weight loader")


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (optionally only those that train)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def load_matching(
    module: nn.Module,
    state: dict[str, torch.Tensor],
    what: str,
    ignore: Sequence[str] = (),
    may_miss: Sequence[str] = (),
) -> None:
    """Load a foreign state dict with strict=False, but refuse anything that is silently wrong:
    keys the module cannot place (unless under `ignore`), shape mismatches, and missing keys other
    than those under `may_miss` (heads, positional tables, new projections). Errors list the keys."""
    own = module.state_dict()
    unexpected = sorted(k for k in state if k not in own and not k.startswith(tuple(ignore)))
    if unexpected:
        raise ValueError(f"{what}: checkpoint keys the model cannot place: {unexpected}")
    load = {k: v for k, v in state.items() if k in own}
    wrong = [
        f"{k} {tuple(v.shape)} != {tuple(own[k].shape)}" for k, v in load.items() if v.shape != own[k].shape
    ]
    if wrong:
        raise ValueError(f"{what}: shape mismatch: {wrong}")
    missing = module.load_state_dict(load, strict=False).missing_keys
    bad = sorted(k for k in missing if not k.startswith(tuple(may_miss)))
    if bad:
        raise ValueError(f"{what}: checkpoint lacks {len(bad)} required key(s): {bad}")


class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch per sample with probability `p` in training."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = float(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"p={self.p}"
