"""Loader of the public OTIS checkpoints into `OTISEncoder`: the encoder is shaped like the checkpoint (time
and lead tables, MLP kind, width and depth), pretraining-only parts are ignored.

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
from typing import Any

import torch
import torch.nn.functional as F

from stence.config import STANDARD_LEADS
from stence.models.base import load_matching
from stence.models.otis import OTIS_SIZES, OTISEncoder
from stence.models.safe_load import CheckpointError, ContractWarning, safe_torch_load

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
