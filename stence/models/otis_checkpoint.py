"""Loader of the public OTIS checkpoints into `OTISEncoder`: the encoder is shaped like the checkpoint (time
and lead tables, MLP kind, width and depth), pretraining-only parts are ignored."""

from __future__ import annotations

import argparse
import inspect
import re
from typing import Any

import torch
import torch.nn.functional as F

from stence.config import STANDARD_LEADS
from stence.models.base import load_matching
from stence.models.otis import OTIS_SIZES, OTISEncoder

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
    # The public OTIS format pickles an argparse.Namespace under "args", which torch.load(weights_only=True)
    # refuses; this loader (and only this format) therefore unpickles fully: load only files you trust.
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise ValueError(f"{path}: not an OTIS checkpoint (expected a dict with 'model')")
    return ckpt


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
        from stence.models.registry import create_ecg_encoder

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
        raise ValueError(f"{path}: no {domain!r} domain in checkpoint domains {sorted(offsets)}")
    n_leads = len(kwargs.get("leads", STANDARD_LEADS))
    domains = ckpt.get("domains") or {}
    if domain in domains and tuple(domains[domain])[-2] < n_leads:
        raise ValueError(f"{path}: domain {domain!r} has {tuple(domains[domain])[-2]} variates < {n_leads}")
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
    name (built with `overrides`), or None (size inferred from the checkpoint's args and width).
    """
    ckpt = _read_otis(path)
    sd = {re.sub(r"^module\.", "", k): v for k, v in ckpt["model"].items()}
    derived = _arch_from_state(sd)
    kwargs, arch = _starting_point(model_or_name, ckpt, derived, overrides, path)
    kwargs.update(derived)
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
