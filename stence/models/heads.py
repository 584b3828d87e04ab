"""Projection heads (StenCE) and downstream classifier heads (linear probe / fine-tune)."""

from __future__ import annotations

import torch
from torch import nn

from stence.models.base import ECGEncoder, no_weight_decay_names


class ProjectionHead(nn.Sequential):
    """LayerNorm(F) -> Linear(F, F) -> ReLU -> Linear(F, out): (B, F) -> (B, out)."""

    def __init__(self, in_dim: int, out_dim: int = 256):
        super().__init__(
            nn.LayerNorm(in_dim), nn.Linear(in_dim, in_dim), nn.ReLU(), nn.Linear(in_dim, out_dim)
        )


class ClassifierHead(nn.Module):
    """BatchNorm1d(affine=False) + Linear (optionally one hidden ReLU layer): (B, F) -> (B, n_out) logits.

    n_out 1 is a binary task, n_out > 1 independent labels (multi-label, one logit each).
    """

    def __init__(self, in_dim: int, n_out: int, hidden: int = 0):
        super().__init__()
        self.norm = nn.BatchNorm1d(in_dim, affine=False)
        if hidden > 0:
            self.fc = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Linear(hidden, n_out))
        else:
            self.fc = nn.Linear(in_dim, n_out)
        self.n_out = n_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.norm(x))


class DownstreamModel(nn.Module):
    """Encoder + classifier head. A linear probe freezes the encoder and keeps it in eval mode (BatchNorm
    statistics and dropout do not move); fine-tuning trains both."""

    def __init__(self, encoder: ECGEncoder, head: ClassifierHead, freeze_encoder: bool):
        super().__init__()
        self.encoder = encoder
        self.head = head
        self.freeze_encoder = freeze_encoder
        if freeze_encoder:
            encoder.freeze()
        else:
            encoder.unfreeze()
        self.train(True)

    def train(self, mode: bool = True) -> DownstreamModel:
        super().train(mode)
        if self.freeze_encoder:
            self.encoder.eval()
        return self

    def forward(self, ecg: torch.Tensor) -> torch.Tensor:
        """(B, 12, T) -> logits (B, n_out)."""
        if self.freeze_encoder:
            with torch.no_grad():
                feats = self.encoder(ecg)
        else:
            feats = self.encoder(ecg)
        return self.head(feats)

    def no_weight_decay(self) -> set[str]:
        return no_weight_decay_names(self)
