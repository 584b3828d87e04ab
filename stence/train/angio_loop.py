"""Stage A, per-worker loop: the angiography aggregator learns the 11 stenosis targets (the SegmentMIL-style
model of the method), either from cached patch features (a pretrained, frozen frame encoder) or, with
`loop_config["end_to_end"]`, together with the frame encoder from the cached key frames (a randomly
initialised encoder gives useless frozen features). Validation reports patient, artery and segment AUROC;
checkpoints are ranked by their mean (`val/auroc_mean`): on a small validation split the patient AUROC alone
saturates within the first tens of epochs and would export a half-trained model (artery and segment queries
near chance, held-out patient AUROC several points below that of the trained model)."""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import torch
from torch import nn

from stence.data.cohort_io import Cohort
from stence.data.datasets import StudyDataset, collate_paired
from stence.data.feature_store import FeatureStore
from stence.data.labels import TARGET_NAMES
from stence.eval.metrics import auroc
from stence.losses import stenosis_loss
from stence.models.angio_e2e import build_angio_end_to_end
from stence.models.registry import build_aggregator
from stence.train.common import (
    autocast,
    gather_outputs,
    loop_setup,
    set_epoch,
    shard_loader,
    to_device,
    train_loader,
    unwrap,
    wrap_model,
)
from stence.train.schedule import param_groups, warmup_cosine
from stence.train.worker import all_reduce_mean, load_latest_state, print0, report

ANGIO_METRIC = "val/auroc_mean"  # ranks stage-A checkpoints: mean of patient, artery and segment AUROC


def target_aurocs(targets: np.ndarray, scores: np.ndarray) -> dict[str, float]:
    """Per-target AUROC, plus the artery and segment means and the mean of the patient, artery and segment
    levels (`val/auroc_mean`, the checkpoint metric); undefined targets are left out of means."""
    out = {}
    with np.errstate(all="ignore"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            per = {n: auroc(targets[:, i], scores[:, i]) for i, n in enumerate(TARGET_NAMES)}
    out["val/auroc_patient"] = per["patient"]
    out["val/auroc_artery"] = float(np.nanmean([per["rca"], per["lca"]]))
    seg = [per[n] for n in TARGET_NAMES[3:] if np.isfinite(per[n])]
    out["val/auroc_segment"] = float(np.mean(seg)) if seg else float("nan")
    levels = [out[f"val/auroc_{k}"] for k in ("patient", "artery", "segment")]
    finite = [v for v in levels if np.isfinite(v)]
    out["val/auroc_mean"] = float(np.mean(finite)) if finite else float("nan")
    out.update({f"val/auroc_{n}": v for n, v in per.items() if n not in ("patient",)})
    return out


def _inputs(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return batch["frames"] if "frames" in batch else batch["angio_feats"]  # (B, V, S, S) or (B, V, P, F)


def _optimizer(core: nn.Module, cfg: Any, end_to_end: bool) -> torch.optim.Optimizer:
    """AdamW at optim.lr_angio; the frame encoder (end to end) at lr_angio x stage_a.encoder_lr_scale."""
    lr, wd = cfg.optim.lr_angio, cfg.optim.weight_decay
    if not end_to_end:
        return torch.optim.AdamW(param_groups(core, lr, wd), lr=lr)
    enc_lr = lr * cfg.stage_a.encoder_lr_scale
    groups = param_groups(core.aggregator, lr, wd) + param_groups(core.frame_encoder, enc_lr, wd)
    return torch.optim.AdamW(groups, lr=lr)


def angio_loop(loop_config: dict[str, Any]) -> None:
    ctx = loop_setup(loop_config)
    cfg, info, tracker = ctx.cfg, ctx.info, ctx.tracker
    cohort = Cohort.open(cfg.data.cohort)
    end_to_end = bool(loop_config.get("end_to_end", False))
    store = None if end_to_end else FeatureStore.open(loop_config["features_dir"])
    train_ds = StudyDataset(cohort, "train", cfg.data, store, train=True, seed=cfg.train.seed,
                            rotate_deg=cfg.stage_a.train_rotate_deg)
    val_ds = StudyDataset(cohort, "val", cfg.data, store, train=False)
    loader, sampler = train_loader(train_ds, cfg.optim.batch_size, info, collate_paired, cfg.train.seed,
                                   cfg.data.num_workers)
    model = wrap_model(build_angio_end_to_end(cfg) if end_to_end else build_aggregator(cfg), info)
    core = unwrap(model)
    opt = _optimizer(core, cfg, end_to_end)
    steps = max(1, len(loader))
    sched = warmup_cosine(opt, cfg.optim.warmup_epochs * steps, cfg.optim.epochs * steps, cfg.optim.warmup_start,
                          cfg.optim.min_lr)
    start = 0
    state = load_latest_state(map_location=info.device)
    if state is not None:
        core.load_state_dict(state["model"])
        opt.load_state_dict(state["optim"])
        sched.load_state_dict(state["sched"])
        start = int(state["epoch"])
        tracker.refill(state.get("tracked"))  # its metrics, had the restart come before they were logged
        print0(f"resuming from epoch {start}")

    for epoch in range(start, cfg.optim.epochs):
        set_epoch(sampler, [train_ds], epoch, cfg.train.seed)
        model.train()
        total, n = 0.0, 0
        for batch in loader:
            batch = to_device(batch, info.device)
            with autocast(info):
                out = model(_inputs(batch), batch["view_mask"], batch["angles"])
                loss = stenosis_loss(out["stenosis_logits"].float(), batch["targets"])["sten_loss"]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.optim.grad_clip > 0:
                nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(batch["targets"])
            n += len(batch["targets"])
        metrics = all_reduce_mean({"train/sten_loss": total / max(n, 1)}, weight=n)

        model.eval()
        with torch.no_grad():
            def val_batches():
                for b in shard_loader(val_ds, cfg.optim.batch_size, info, collate_paired):
                    b = to_device(b, info.device)
                    with autocast(info):
                        logits = core(_inputs(b), b["view_mask"], b["angles"])["stenosis_logits"].float()
                    yield {"index": b["index"].cpu().numpy(), "p": torch.sigmoid(logits).cpu().numpy(),
                           "y": b["targets"].cpu().numpy()}
            val = gather_outputs(val_batches())
        metrics.update(target_aurocs(val["y"], val["p"]))
        metrics["epoch"] = epoch + 1
        print0(f"epoch {epoch + 1}/{cfg.optim.epochs} loss={metrics['train/sten_loss']:.4f} "
               f"patient={metrics['val/auroc_patient']:.3f} artery={metrics['val/auroc_artery']:.3f} "
               f"segment={metrics['val/auroc_segment']:.3f} mean={metrics['val/auroc_mean']:.3f}")
        ckpt = None
        if info.rank == 0:
            ckpt = {"model": core.state_dict(), "optim": opt.state_dict(), "sched": sched.state_dict(),
                    "epoch": epoch + 1, "config": loop_config["config"],
                    "tracked": tracker.stamp(metrics, step=epoch + 1)}
        report(metrics, ckpt)  # the checkpoint first: a tracking store that is down never costs an epoch
        tracker.log_metrics(metrics, step=epoch + 1)
    tracker.close()
