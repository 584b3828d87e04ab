"""One registry and factory per model family, and the `build_*` functions that wire models from config.

`create_*` looks a name up and applies overrides; `build_*` reads a `Config`. Model files register
themselves with the decorators below; the registry imports them lazily, so they can import it freely.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from torch import nn

if TYPE_CHECKING:
    from stence.config import Config
    from stence.models.aggregator import SegmentMILAggregator
    from stence.models.base import ECGEncoder
    from stence.models.frame_encoder import FrameEncoder
    from stence.models.heads import DownstreamModel
    from stence.models.stence import StenceModel

_BUILTIN_MODULES = ("stence.models.otis", "stence.models.echoingecg", "stence.models.frame_encoder")
_ECG_ENCODERS: dict[str, Callable[..., nn.Module]] = {}
_FRAME_ENCODERS: dict[str, Callable[..., nn.Module]] = {}


def _load_builtin() -> None:
    for mod in _BUILTIN_MODULES:
        importlib.import_module(mod)


def _register(table: dict[str, Callable[..., nn.Module]], family: str, name: str):
    def deco(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in table and table[name] is not fn:
            raise ValueError(f"{family} {name!r} is already registered")
        table[name] = fn
        return fn

    return deco


def _plain(v: Any) -> Any:
    """Overrides are stored in checkpoints loaded with weights_only=True: keep them plain."""
    return list(v) if isinstance(v, tuple) else v


def _create(table: dict[str, Callable[..., nn.Module]], family: str, name: str, overrides: dict) -> nn.Module:
    _load_builtin()
    if name not in table:
        raise ValueError(f"unknown {family} {name!r}; valid: {sorted(table)}")
    overrides = dict(overrides)
    contract = overrides.pop("contract", None) if table is _ECG_ENCODERS else None
    model = table[name](**overrides)
    model.arch = {"name": name, "overrides": {k: _plain(v) for k, v in overrides.items()}}
    if contract is not None:  # rebuilt from a checkpoint's architecture: its input contract comes back
        model.set_contract(contract)
    return model


def register_ecg_encoder(name: str):
    """Decorator: register a builder `fn(**overrides) -> ECGEncoder` under `name`."""
    return _register(_ECG_ENCODERS, "ECG encoder", name)


def create_ecg_encoder(name: str, **overrides: Any) -> ECGEncoder:
    """Build a registered ECG encoder; unknown names raise ValueError with the valid list."""
    return _create(_ECG_ENCODERS, "ECG encoder", name, overrides)  # type: ignore[return-value]


def list_ecg_encoders() -> list[str]:
    _load_builtin()
    return sorted(_ECG_ENCODERS)


def register_frame_encoder(name: str):
    """Decorator: register a builder `fn(**overrides) -> FrameEncoder` under `name`."""
    return _register(_FRAME_ENCODERS, "frame encoder", name)


def create_frame_encoder(name: str, **overrides: Any) -> FrameEncoder:
    """Build a registered angiography frame encoder; unknown names raise ValueError with the valid list."""
    return _create(_FRAME_ENCODERS, "frame encoder", name, overrides)  # type: ignore[return-value]


def list_frame_encoders() -> list[str]:
    _load_builtin()
    return sorted(_FRAME_ENCODERS)


def create_aggregator(**kw: Any) -> SegmentMILAggregator:
    """The multi-view query decoder (one architecture, configured by keyword)."""
    from stence.models.aggregator import SegmentMILAggregator

    return SegmentMILAggregator(**kw)


# ---------------------------------------------------------------------------------------------------
# wiring from config


def build_ecg_encoder(cfg: Config) -> ECGEncoder:
    """ECG encoder of `cfg.model.ecg` under the input contract `model.contract` selects (its rate and window
    build the encoder), with public weights and the per-lead scaler (`model.ecg_scaler`, EchoingECG only)
    carried by the contract."""
    from stence.data.contract import resolve_contract

    contract = resolve_contract(cfg, _scaler_in_input_order(cfg))
    encoder = create_ecg_encoder(
        cfg.model.ecg,
        fs=contract.fs,
        n_samples=contract.n_samples,
        leads=tuple(cfg.data.leads),
        lead_order=cfg.model.lead_order,
    )
    if cfg.model.ecg_checkpoint:
        encoder = encoder.load_pretrained(cfg.model.ecg_checkpoint)
    return encoder.set_contract(contract)  # after loading: a loader may rebuild the encoder


def _scaler_in_input_order(cfg: Config) -> tuple[list[float], list[float]] | None:
    """`model.ecg_scaler` (fitted in the weights' lead order) as (mean, scale) in `data.leads` order."""
    if not cfg.model.ecg_scaler:
        return None
    if not cfg.model.ecg.startswith("echoingecg"):
        raise ValueError(f"model.ecg_scaler is for EchoingECG encoders; {cfg.model.ecg!r} has no input scaler")
    from stence.models.base import LEAD_ORDERS
    from stence.models.safe_load import load_scaler

    weights_order = LEAD_ORDERS[cfg.model.lead_order]
    mean, scale = load_scaler(cfg.model.ecg_scaler, n_features=len(weights_order), leads=weights_order)
    pos = {name.lower(): i for i, name in enumerate(weights_order)}
    idx = [pos[name.lower()] for name in cfg.data.leads]
    return [float(mean[i]) for i in idx], [float(scale[i]) for i in idx]


def build_frame_encoder(cfg: Config) -> FrameEncoder:
    """Frame encoder of `cfg.feature`: seeded init, then local DINOv2 weights if configured."""
    import torch

    from stence.models.frame_encoder import load_dinov2_checkpoint

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.feature.seed)
        enc = create_frame_encoder(
            cfg.feature.frame_encoder, img_size=cfg.feature.image_size, feature_dim=cfg.feature.feature_dim
        )
    if cfg.feature.frame_checkpoint:
        enc = load_dinov2_checkpoint(enc, cfg.feature.frame_checkpoint)
    return enc


def aggregator_kwargs(cfg: Config) -> dict[str, Any]:
    """Aggregator constructor arguments from `cfg.model` / `cfg.feature` (also stored in checkpoints)."""
    m = cfg.model
    return {
        "feature_dim": cfg.feature.feature_dim,
        "d": m.angio_dim,
        "heads": m.angio_heads,
        "ffn": m.angio_ffn,
        "layers": m.angio_layers,
        "dropout": m.angio_dropout,
        "angulation_embedding": m.angulation_embedding,
        "frozen_no_cls": m.frozen_no_cls,
    }


def build_aggregator(cfg: Config) -> SegmentMILAggregator:
    """Aggregator from config, initialised from a stage-A checkpoint when `model.angio_checkpoint` is set."""
    from stence.models.checkpoint import load_aggregator_weights

    agg = create_aggregator(**aggregator_kwargs(cfg))
    if cfg.model.angio_checkpoint:
        load_aggregator_weights(agg, cfg.model.angio_checkpoint)
    return agg


def build_stence_model(cfg: Config) -> StenceModel:
    """Both towers, both projection heads and the temperature, as `cfg` describes them."""
    from stence.models.stence import StenceModel

    return StenceModel(
        build_ecg_encoder(cfg),
        build_aggregator(cfg),
        proj_dim=cfg.model.proj_dim,
        temperature=cfg.loss.temperature,
        learnable=cfg.loss.learnable_temperature,
    )


def downstream_outputs(cfg: Config) -> int:
    """Logit count of the downstream task: 12 EchoNext flags, else one threshold task."""
    return 12 if cfg.downstream.task == "echonext" else 1


def build_downstream_model(cfg: Config, encoder: ECGEncoder, n_out: int | None = None) -> DownstreamModel:
    """Probe (`downstream.mode="probe"`: frozen encoder, head only) or full fine-tune (`"finetune"`)."""
    from stence.models.heads import ClassifierHead, DownstreamModel

    mode = cfg.downstream.mode
    if mode not in ("probe", "finetune"):
        raise ValueError(f"downstream.mode must be 'probe' or 'finetune', got {mode!r}")
    n_out = downstream_outputs(cfg) if n_out is None else n_out
    head = ClassifierHead(encoder.embed_dim, n_out, hidden=cfg.downstream.hidden)
    return DownstreamModel(encoder, head, freeze_encoder=(mode == "probe"))
