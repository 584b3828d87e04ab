"""Checkpoints that describe themselves: weights + resolved config + input spec + architecture.

Everything in the file is plain data (dicts, lists, numbers, strings, tensors), so it loads with
`torch.load(weights_only=True)` and `load_*` rebuilds the model from the file alone.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from stence.models.aggregator import SegmentMILAggregator
from stence.models.base import ECGEncoder
from stence.models.catalog import create_ecg_encoder
from stence.models.safe_load import safe_torch_load
from stence.models.stence import StenceModel

FORMAT_VERSION = 1


def _write(path: str | Path, payload: dict[str, Any]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)  # atomic: a reader never sees half a file


def _read(path: str | Path, kind: str | tuple[str, ...]) -> dict[str, Any]:
    payload = safe_torch_load(path, "StenCE checkpoint")
    kinds = (kind,) if isinstance(kind, str) else kind
    if not isinstance(payload, dict) or payload.get("kind") not in kinds:
        raise ValueError(f"{path}: not a {' or '.join(kinds)} checkpoint")
    if payload.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(f"{path}: format_version {payload['format_version']} is newer than {FORMAT_VERSION}")
    return payload


def _arch(encoder: ECGEncoder) -> dict[str, Any]:
    arch = getattr(encoder, "arch", None) or {}
    if "name" not in arch:
        raise ValueError("encoder has no registry name; build it with create_ecg_encoder")
    return {"name": arch["name"], "overrides": dict(arch.get("overrides", {}))}


def save_encoder(
    path: str | Path,
    encoder: ECGEncoder,
    cfg_dict: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> None:
    """Write an ECG encoder with its resolved config, input spec and registry architecture."""
    _write(
        path,
        {
            "kind": "ecg_encoder",
            "format_version": FORMAT_VERSION,
            "arch": _arch(encoder),
            "input_spec": encoder.input_spec,
            "config": cfg_dict or {},
            "state_dict": encoder.state_dict(),
            "extra": extra or {},
        },
    )


def _rebuild_encoder(arch: dict[str, Any], state: dict[str, torch.Tensor]) -> ECGEncoder:
    encoder = create_ecg_encoder(arch["name"], **arch.get("overrides", {}))
    encoder.load_state_dict(state, strict=True)
    return encoder


def load_encoder(path: str | Path) -> ECGEncoder:
    """Rebuild an ECG encoder from an encoder checkpoint, or take the ECG tower of a StenCE checkpoint."""
    payload = _read(path, ("ecg_encoder", "stence"))
    if payload["kind"] == "stence":
        return load_stence(path).ecg_encoder
    return _rebuild_encoder(payload["arch"], payload["state_dict"])


def save_stence(
    path: str | Path,
    model: StenceModel,
    cfg_dict: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> None:
    """Write the whole two-tower model (both towers, heads, temperature) so it rebuilds from the file."""
    _write(
        path,
        {
            "kind": "stence",
            "format_version": FORMAT_VERSION,
            "arch": {
                "ecg": _arch(model.ecg_encoder),
                "aggregator": dict(model.aggregator.init_kwargs),
                "stence": dict(model.init_kwargs),
            },
            "input_spec": model.ecg_encoder.input_spec,
            "config": cfg_dict or {},
            "state_dict": model.state_dict(),
            "extra": extra or {},
        },
    )


def load_stence(path: str | Path) -> StenceModel:
    """Rebuild a StenceModel from a `save_stence` file alone."""
    payload = _read(path, "stence")
    arch = payload["arch"]
    encoder = create_ecg_encoder(arch["ecg"]["name"], **arch["ecg"].get("overrides", {}))
    model = StenceModel(encoder, SegmentMILAggregator(**arch["aggregator"]), **arch["stence"])
    model.load_state_dict(payload["state_dict"], strict=True)
    return model


def save_aggregator(
    path: str | Path,
    aggregator: SegmentMILAggregator,
    cfg_dict: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> None:
    """Write a stage-A aggregator (used to initialise stage B through `model.angio_checkpoint`)."""
    _write(
        path,
        {
            "kind": "aggregator",
            "format_version": FORMAT_VERSION,
            "arch": dict(aggregator.init_kwargs),
            "config": cfg_dict or {},
            "state_dict": aggregator.state_dict(),
            "extra": extra or {},
        },
    )


def load_aggregator(path: str | Path) -> SegmentMILAggregator:
    """Rebuild an aggregator from a `save_aggregator` file alone."""
    payload = _read(path, "aggregator")
    agg = SegmentMILAggregator(**payload["arch"])
    agg.load_state_dict(payload["state_dict"], strict=True)
    return agg


def load_aggregator_weights(aggregator: SegmentMILAggregator, path: str | Path) -> SegmentMILAggregator:
    """Copy aggregator weights from an aggregator or StenCE checkpoint into `aggregator` (strict)."""
    payload = _read(path, ("aggregator", "stence"))
    state = payload["state_dict"]
    if payload["kind"] == "stence":
        state = {k.removeprefix("aggregator."): v for k, v in state.items() if k.startswith("aggregator.")}
    aggregator.load_state_dict(state, strict=True)
    return aggregator
