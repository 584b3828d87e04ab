"""The StenCE two-tower model: ECG encoder and angiography aggregator, both projection heads, temperature."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from stence.models.aggregator import SegmentMILAggregator
from stence.models.base import ECGEncoder, no_weight_decay_names
from stence.models.heads import ProjectionHead

MAX_LOGIT_SCALE = 100.0  # CLIP's cap on 1 / temperature


class StenceModel(nn.Module):
    """Returns open_clip-style outputs: normalised features of both towers, stenosis logits, logit scale."""

    def __init__(
        self,
        ecg_encoder: ECGEncoder,
        aggregator: SegmentMILAggregator,
        proj_dim: int = 256,
        temperature: float = 0.2,
        learnable: bool = False,
    ):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.ecg_encoder = ecg_encoder
        self.aggregator = aggregator
        self.ecg_proj = ProjectionHead(ecg_encoder.embed_dim, proj_dim)
        self.angio_proj = ProjectionHead(aggregator.d, proj_dim)
        init = torch.tensor(math.log(1.0 / temperature))
        if learnable:
            self.logit_scale = nn.Parameter(init)
        else:
            self.register_buffer("logit_scale", init)
        self.init_kwargs = {"proj_dim": proj_dim, "temperature": temperature, "learnable": learnable}

    def encode_ecg(self, ecg: torch.Tensor) -> torch.Tensor:
        """(B, 12, T) -> (B, proj_dim), L2-normalised."""
        return F.normalize(self.ecg_proj(self.ecg_encoder(ecg)), dim=-1)

    def encode_angio(
        self, angio_feats: torch.Tensor, view_mask: torch.Tensor, angles: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """Study features (B, V, P, F) -> {"angio_features" (B, proj_dim) normalised, "stenosis_logits"}."""
        agg = self.aggregator(angio_feats, view_mask, angles)
        return {
            "angio_features": F.normalize(self.angio_proj(agg["study_embedding"]), dim=-1),
            "stenosis_logits": agg["stenosis_logits"],
        }

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """batch: ecg (B, 12, T), angio_feats (B, V, P, F), view_mask (B, V), optional angles (B, V, 2)."""
        out = self.encode_angio(batch["angio_feats"], batch["view_mask"], batch.get("angles"))
        out["ecg_features"] = self.encode_ecg(batch["ecg"])
        out["logit_scale"] = self.logit_scale.exp().clamp(max=MAX_LOGIT_SCALE)
        return out

    def no_weight_decay(self) -> set[str]:
        return no_weight_decay_names(self)
