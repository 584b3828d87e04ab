"""A scorer: an ECG encoder plus its stenosis head, in one self-describing file.

This is what gets registered and what `stence predict` runs: the encoder checkpoint payload (architecture,
input contract, weights), the classifier head (its constructor arguments and weights), the task it was
trained on and the metrics it earned. Everything is plain data: `torch.load(weights_only=True)` reads it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from stence.models.base import ECGEncoder
from stence.models.catalog import create_ecg_encoder
from stence.models.heads import ClassifierHead
from stence.models.safe_load import safe_torch_load

FORMAT_VERSION = 1


class Scorer(nn.Module):
    """(B, 12, T) ECG crops at the input contract -> {"embedding" (B, D), "probability" (B, n_out)}."""

    def __init__(self, encoder: ECGEncoder, head: ClassifierHead, task: str):
        super().__init__()
        self.encoder, self.head, self.task = encoder, head, task

    @property
    def input_spec(self) -> dict[str, Any]:
        return self.encoder.input_spec

    def forward(self, ecg: torch.Tensor) -> dict[str, torch.Tensor]:
        emb = self.encoder(ecg)  # (B, D)
        return {"embedding": emb, "probability": torch.sigmoid(self.head(emb))}  # (B, n_out)


def save_scorer(path: str | Path, encoder: ECGEncoder, head: ClassifierHead, task: str,
                cfg_dict: dict[str, Any] | None = None, metrics: dict[str, Any] | None = None) -> None:
    arch = getattr(encoder, "arch", None) or {}
    if "name" not in arch:
        raise ValueError("encoder has no registry name; build it with create_ecg_encoder")
    head_kwargs = {"in_dim": head.norm.num_features, "n_out": head.n_out,
                   "hidden": head.fc[0].out_features if isinstance(head.fc, nn.Sequential) else 0}
    payload = {
        "kind": "scorer", "format_version": FORMAT_VERSION, "task": task,
        "encoder": {"arch": {"name": arch["name"], "overrides": dict(arch.get("overrides", {}))},
                    "state_dict": encoder.state_dict()},
        "head": {"kwargs": head_kwargs, "state_dict": head.state_dict()},
        "input_spec": encoder.input_spec, "config": cfg_dict or {}, "metrics": metrics or {},
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)


def load_scorer(path: str | Path) -> Scorer:
    """Rebuild a Scorer from its file alone (weights_only load), in eval mode."""
    payload = safe_torch_load(path, "scorer")
    if not isinstance(payload, dict) or payload.get("kind") != "scorer":
        raise ValueError(f"{path}: not a scorer checkpoint (expected kind 'scorer')")
    enc = payload["encoder"]
    encoder = create_ecg_encoder(enc["arch"]["name"], **enc["arch"].get("overrides", {}))
    encoder.load_state_dict(enc["state_dict"], strict=True)
    head = ClassifierHead(**payload["head"]["kwargs"])
    head.load_state_dict(payload["head"]["state_dict"], strict=True)
    return Scorer(encoder, head, payload["task"]).eval()


def scorer_metadata(path: str | Path) -> dict[str, Any]:
    """Task, input contract, config and metrics of a scorer file, without building the model."""
    payload = safe_torch_load(path, "scorer")
    return {k: payload[k] for k in ("task", "input_spec", "config", "metrics")}
