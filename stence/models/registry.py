"""Wiring models from config: the `build_*` functions, and the model catalog's `create_*` / `register_*`.

`create_*` looks a name up and applies overrides (stence/models/catalog.py, where model files register
themselves with the decorators); `build_*` reads a `Config`. Both are imported from here.
"""

from __future__ import annotations

from typing import Any

import torch

from stence.config import Config
from stence.data.contract import resolve_contract
from stence.models.aggregator import SegmentMILAggregator
from stence.models.base import LEAD_ORDERS, ECGEncoder
from stence.models.catalog import (
    create_ecg_encoder,
    create_frame_encoder,
    list_ecg_encoders,
    list_frame_encoders,
    register_ecg_encoder,
    register_frame_encoder,
)
from stence.models.checkpoint import load_aggregator_weights
from stence.models.frame_encoder import FrameEncoder, load_dinov2_checkpoint
from stence.models.heads import ClassifierHead, DownstreamModel
from stence.models.safe_load import load_scaler
from stence.models.stence import StenceModel


def create_aggregator(**kw: Any) -> SegmentMILAggregator:
    """The multi-view query decoder (one architecture, configured by keyword)."""
    return SegmentMILAggregator(**kw)


# ---------------------------------------------------------------------------------------------------
# wiring from config


def build_ecg_encoder(cfg: Config) -> ECGEncoder:
    """ECG encoder of `cfg.model.ecg` under the input contract `model.contract` selects (its rate and window
    build the encoder), with public weights and the per-lead scaler (`model.ecg_scaler`, EchoingECG only)
    carried by the contract."""
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
    weights_order = LEAD_ORDERS[cfg.model.lead_order]
    mean, scale = load_scaler(cfg.model.ecg_scaler, n_features=len(weights_order), leads=weights_order)
    pos = {name.lower(): i for i, name in enumerate(weights_order)}
    idx = [pos[name.lower()] for name in cfg.data.leads]
    return [float(mean[i]) for i in idx], [float(scale[i]) for i in idx]


def build_frame_encoder(cfg: Config) -> FrameEncoder:
    """Frame encoder of `cfg.feature`: seeded init, then local DINOv2 weights if configured."""
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
    agg = create_aggregator(**aggregator_kwargs(cfg))
    if cfg.model.angio_checkpoint:
        load_aggregator_weights(agg, cfg.model.angio_checkpoint)
    return agg


def build_stence_model(cfg: Config) -> StenceModel:
    """Both towers, both projection heads and the temperature, as `cfg` describes them."""
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
    mode = cfg.downstream.mode
    if mode not in ("probe", "finetune"):
        raise ValueError(f"downstream.mode must be 'probe' or 'finetune', got {mode!r}")
    n_out = downstream_outputs(cfg) if n_out is None else n_out
    head = ClassifierHead(encoder.embed_dim, n_out, hidden=cfg.downstream.hidden)
    return DownstreamModel(encoder, head, freeze_encoder=(mode == "probe"))


__all__ = [
    "aggregator_kwargs",
    "build_aggregator",
    "build_downstream_model",
    "build_ecg_encoder",
    "build_frame_encoder",
    "build_stence_model",
    "create_aggregator",
    "create_ecg_encoder",
    "create_frame_encoder",
    "downstream_outputs",
    "list_ecg_encoders",
    "list_frame_encoders",
    "register_ecg_encoder",
    "register_frame_encoder",
]
