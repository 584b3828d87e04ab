"""SegmentMIL-style angiography aggregator: 12 learned queries read every patch of every view of a study.

Query 0 is the CLIP query (the study embedding); queries 1..11 are patient, RCA, LCA and the 8 major
segments, in `stence.data.labels.TARGET_NAMES` order, each mapped to one stenosis logit by a shared
Linear(d -> 1). Padded views are excluded with a key-padding mask, so adding padding changes nothing.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from stence.data.labels import TARGET_NAMES

N_TARGETS = len(TARGET_NAMES)  # patient, RCA, LCA, 8 major segments (stence/data/labels.py)
N_QUERIES = N_TARGETS + 1  # plus the CLIP query


class SegmentMILAggregator(nn.Module):
    """Queries cross-attend to all patch tokens of a study through a pre-norm transformer decoder."""

    def __init__(
        self,
        feature_dim: int = 64,  # width of the cached patch features
        d: int = 64,  # decoder width (paper: 512)
        heads: int = 4,
        ffn: int = 256,  # feed-forward width (paper: 2048)
        layers: int = 2,
        dropout: float = 0.1,
        angulation_embedding: bool = True,  # add an MLP of (sin, cos) of the C-arm angles to each view's tokens
        frozen_no_cls: bool = False,  # ablation: frozen weights, study embedding = patient query output
    ):
        super().__init__()
        self.init_kwargs: dict[str, Any] = dict(
            feature_dim=feature_dim,
            d=d,
            heads=heads,
            ffn=ffn,
            layers=layers,
            dropout=dropout,
            angulation_embedding=angulation_embedding,
            frozen_no_cls=frozen_no_cls,
        )
        self.d = d
        self.in_proj = nn.Identity() if feature_dim == d else nn.Linear(feature_dim, d)
        self.queries = nn.Parameter(torch.randn(N_QUERIES, d) * 0.02)
        self.angle_mlp = (
            nn.Sequential(nn.Linear(4, d), nn.GELU(), nn.Linear(d, d)) if angulation_embedding else None
        )
        layer = nn.TransformerDecoderLayer(
            d, heads, ffn, dropout, activation="gelu", batch_first=True, norm_first=True
        )
        self.decoder = nn.TransformerDecoder(layer, layers, norm=nn.LayerNorm(d))
        self.sten_head = nn.Linear(d, 1)
        self.frozen_no_cls = frozen_no_cls
        self.frozen = False
        if frozen_no_cls:
            self.freeze()

    def freeze(self) -> SegmentMILAggregator:
        """Frozen weights, and eval mode from now on (dropout off) whatever the parent's mode."""
        for p in self.parameters():
            p.requires_grad_(False)
        self.frozen = True
        return self.train(False)

    def train(self, mode: bool = True) -> SegmentMILAggregator:
        return super().train(mode and not self.frozen)

    def forward(
        self, feats: torch.Tensor, view_mask: torch.Tensor, angles: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """feats (B, V, P, F), view_mask (B, V) True = real view, angles (B, V, 2) degrees or None."""
        B, V, P, _ = feats.shape
        if view_mask.shape != (B, V):
            raise ValueError(f"view_mask shape {tuple(view_mask.shape)} != {(B, V)}")
        view_mask = view_mask.bool()
        if not bool(view_mask.any(dim=1).all()):
            raise ValueError("every study needs at least one real view")
        real = view_mask[:, :, None, None]
        x = self.in_proj(torch.where(real, feats, 0.0))  # (B, V, P, F) -> (B, V, P, d); padding zeroed
        if self.angle_mlp is not None and angles is not None:
            rad = torch.deg2rad(torch.where(view_mask[..., None], angles.to(x.dtype), 0.0))  # (B, V, 2)
            code = torch.cat([rad.sin(), rad.cos()], dim=-1)  # (B, V, 4)
            x = x + self.angle_mlp(code)[:, :, None, :]  # same offset for every token of a view
        memory = x.reshape(B, V * P, self.d)  # (B, V * P, d)
        pad = (~view_mask)[:, :, None].expand(B, V, P).reshape(B, V * P)  # True = ignore
        out = self.decoder(self.queries.expand(B, -1, -1), memory, memory_key_padding_mask=pad)  # (B, 12, d)
        logits = self.sten_head(out[:, 1:]).squeeze(-1)  # (B, 11, d) -> (B, 11)
        study = out[:, 1] if self.frozen_no_cls else out[:, 0]  # patient query / CLIP query
        return {"study_embedding": study, "stenosis_logits": logits}
