"""Stage A end to end: the frame encoder and the aggregator trained together on the cached key frames.

The forward pass is exactly what `stence features` followed by the aggregator computes (key frame 0 ->
`prepare_frames` -> frame encoder -> (V, P, F) patch features -> aggregator), so the exported frame encoder,
loaded with `feature.frame_checkpoint`, produces for stage B the features the exported aggregator was
trained on.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from stence.config import Config
from stence.models.aggregator import SegmentMILAggregator
from stence.models.checkpoint import load_aggregator
from stence.models.frame_encoder import FrameEncoder, load_dinov2_checkpoint, prepare_frames
from stence.models.registry import build_aggregator, build_frame_encoder, create_frame_encoder

_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


def trains_frame_encoder(cfg: Config) -> bool:
    """Resolve `stage_a.train_frame_encoder`: "auto" trains end to end unless `feature.frame_checkpoint` is
    set (pretrained or stage-A weights are then used frozen through the feature cache, as in the paper)."""
    value = str(cfg.stage_a.train_frame_encoder).strip().lower()
    if value == "auto":
        return not cfg.feature.frame_checkpoint
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError(f"stage_a.train_frame_encoder must be auto, true or false, got {value!r}")


class AngioEndToEnd(nn.Module):
    """Frame encoder on every real view's key frame, then the SegmentMIL aggregator."""

    def __init__(self, frame_encoder: FrameEncoder, aggregator: SegmentMILAggregator):
        super().__init__()
        self.frame_encoder = frame_encoder
        self.aggregator = aggregator

    def encode(self, frames: torch.Tensor, view_mask: torch.Tensor) -> torch.Tensor:
        """frames (B, V, S, S) in [0, 1], view_mask (B, V) -> patch features (B, V, P, F); padding zero."""
        mask = view_mask.bool()
        images = prepare_frames(frames[mask], self.frame_encoder.img_size)  # (N real, 3, H, W)
        tokens = self.frame_encoder(images)  # (N, P, F)
        out = tokens.new_zeros(mask.shape + tokens.shape[1:])  # (B, V, P, F)
        out[mask] = tokens
        return out

    def forward(
        self, frames: torch.Tensor, view_mask: torch.Tensor, angles: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """frames (B, V, S, S), view_mask (B, V) True = real view, angles (B, V, 2) -> aggregator outputs."""
        return self.aggregator(self.encode(frames, view_mask), view_mask, angles)


def build_angio_end_to_end(cfg: Config) -> AngioEndToEnd:
    """Frame encoder of `cfg.feature` (seeded init or its checkpoint) + aggregator of `cfg.model`."""
    return AngioEndToEnd(build_frame_encoder(cfg), build_aggregator(cfg))


def load_stage_a_export(export_dir: str | Path, frame_encoder: str) -> AngioEndToEnd:
    """The pair `stence train-angio` exports (frame_encoder.pt + aggregator.pt), in eval mode; `frame_encoder`
    is the registry name it was trained with (`feature.frame_encoder`)."""
    export = Path(export_dir)
    enc = load_dinov2_checkpoint(create_frame_encoder(frame_encoder), str(export / "frame_encoder.pt"))
    return AngioEndToEnd(enc, load_aggregator(export / "aggregator.pt")).eval()


def save_frame_encoder(
    path: str | Path, encoder: FrameEncoder, config: dict[str, Any], extra: dict[str, Any] | None = None
) -> Path:
    """Write a trained frame encoder that `load_dinov2_checkpoint` reads (weights under "model", DINOv2 key
    layout), with its registry architecture and the resolved config; point `feature.frame_checkpoint` at it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "kind": "frame_encoder",
        "model": {k: v.detach().cpu() for k, v in encoder.state_dict().items()},
        "arch": dict(getattr(encoder, "arch", {}) or {}),
        "config": config,
        **(extra or {}),
    }
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)
    return path


__all__ = ["AngioEndToEnd", "build_angio_end_to_end", "save_frame_encoder", "trains_frame_encoder"]
