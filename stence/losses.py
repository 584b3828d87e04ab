"""StenCE losses: CLIP InfoNCE with cross-worker negatives, the weighted stenosis BCE, and their sum.

Each returns a dict of terms; keys ending in `_loss` are losses, `loss` is what to backpropagate.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from stence.data.labels import TARGET_NAMES

# stenosis term weights: patient, artery (RCA, LCA), 8 major segments
W_PATIENT, W_ARTERY, W_SEGMENT = 0.4, 0.4, 0.2


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _GatherRows(torch.autograd.Function):
    """All-gather along dim 0 whose backward hands each rank the summed gradient of its own rows.

    Ours rather than `torch.distributed.nn.functional.all_gather`: that function binds the world process
    group as a default argument when its module is first imported. Imported after `init_process_group`,
    it kept the group alive past `destroy_process_group`. Gloo processes then aborted at interpreter exit
    ("terminate called without an active exception") in about 1 run in 10. It is also deprecated.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # (B, D) -> (world * B, D)
        rank, world = _world()
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x)
        ctx.rows = (rank * x.shape[0], (rank + 1) * x.shape[0])
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # (world * B, D) -> (B, D)
        # every rank's loss used our rows: their gradient is the sum over ranks (a reduce-scatter, done as
        # an all-reduce because gloo has no reduce-scatter; the tensor is only world * B x D)
        grad = grad.contiguous()
        dist.all_reduce(grad)
        start, stop = ctx.rows
        return grad[start:stop]


def gather_features(x: torch.Tensor) -> torch.Tensor:
    """(B, D) per worker -> (world * B, D) in rank order, differentiable; identity on one process."""
    _, world = _world()
    if world == 1:
        return x
    return _GatherRows.apply(x)


def clip_loss(
    ecg: torch.Tensor,
    angio: torch.Tensor,
    logit_scale: torch.Tensor,
    gather: bool = True,
    local_loss: bool = True,
) -> torch.Tensor:
    """Symmetric InfoNCE over L2-normalised (B, D) features: mean of ECG->angio and angio->ECG cross-entropy.

    With `gather` on several workers the negatives span every worker's batch (gradients flow back through
    the gather); `local_loss` keeps the logits at local x global (labels offset by rank), otherwise every
    worker computes the full global x global matrix.
    """
    rank, world = _world()
    B = ecg.shape[0]
    if gather and world > 1:
        all_ecg, all_angio = gather_features(ecg), gather_features(angio)
        if local_loss:
            logits_ecg = logit_scale * ecg @ all_angio.T  # (B, world * B)
            logits_angio = logit_scale * angio @ all_ecg.T
            labels = torch.arange(B, device=ecg.device) + rank * B
        else:
            logits_ecg = logit_scale * all_ecg @ all_angio.T  # (world * B, world * B)
            logits_angio = logits_ecg.T
            labels = torch.arange(world * B, device=ecg.device)
    else:
        logits_ecg = logit_scale * ecg @ angio.T  # (B, B)
        logits_angio = logits_ecg.T
        labels = torch.arange(B, device=ecg.device)
    return (F.cross_entropy(logits_ecg, labels) + F.cross_entropy(logits_angio, labels)) / 2


def stenosis_loss(logits: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
    """(B, 11) logits and 0/1 targets in TARGET_NAMES order -> weighted BCE and its three parts.

    sten_loss = 0.4 * patient + 0.4 * mean(RCA, LCA) + 0.2 * mean(8 segments), element-wise BCE-with-logits.
    """
    if logits.shape[-1] != len(TARGET_NAMES) or targets.shape != logits.shape:
        raise ValueError(
            f"expected (B, {len(TARGET_NAMES)}) logits and targets, got {tuple(logits.shape)}, {tuple(targets.shape)}"
        )
    bce = F.binary_cross_entropy_with_logits(logits, targets.to(logits.dtype), reduction="none")  # (B, 11)
    patient, artery, segment = bce[:, 0].mean(), bce[:, 1:3].mean(), bce[:, 3:].mean()
    return {
        "sten_patient": patient,
        "sten_artery": artery,
        "sten_segment": segment,
        "sten_loss": W_PATIENT * patient + W_ARTERY * artery + W_SEGMENT * segment,
    }


class StenceLoss:
    """L = L_CLIP + w_sten * L_sten on the outputs of `StenceModel.forward`.

    The stenosis logits come from the angiography tower only, so the ECG tower learns through L_CLIP alone.
    With w_sten = 0 the stenosis term is still reported (detached) but adds nothing to the gradient.
    """

    def __init__(self, w_sten: float = 0.3, gather: bool = True, local_loss: bool = True):
        if w_sten < 0:
            raise ValueError(f"w_sten must be >= 0, got {w_sten}")
        self.w_sten, self.gather, self.local_loss = float(w_sten), gather, local_loss

    def __call__(
        self, outputs: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        clip = clip_loss(
            outputs["ecg_features"],
            outputs["angio_features"],
            outputs["logit_scale"],
            gather=self.gather,
            local_loss=self.local_loss,
        )
        terms = {"clip_loss": clip}
        if self.w_sten > 0:
            sten = stenosis_loss(outputs["stenosis_logits"], batch["targets"])
            terms.update(sten)
            terms["loss"] = clip + self.w_sten * sten["sten_loss"]
        else:
            if "targets" in batch:
                with torch.no_grad():
                    terms.update(stenosis_loss(outputs["stenosis_logits"], batch["targets"]))
            terms["loss"] = clip
        return terms
