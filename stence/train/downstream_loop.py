"""Stage C, per-worker loop: linear probe or full fine-tune of an ECG encoder on a threshold task (or the
12 EchoNext flags). The paper's recipe: BatchNorm1d(affine=False) + Linear head, AdamW with separate head
and backbone learning rates, weight decay 0.05, label smoothing 0.1, warm-up then cosine. The model is
selected on validation AUROC only; the test split is scored once, with the selected weights, at the end.
"""

from __future__ import annotations

import copy
import warnings
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from stence.config import Config
from stence.data.cohort_io import Cohort
from stence.data.contract import InputContract
from stence.data.datasets import EcgDataset
from stence.data.echonext import EchoNextDataset
from stence.eval.metrics import auroc
from stence.models.base import ECGEncoder
from stence.models.checkpoint import load_encoder
from stence.models.registry import build_downstream_model, build_ecg_encoder
from stence.models.scorer import load_scorer
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

DOWNSTREAM_METRIC = "val/auroc"


def load_downstream_encoder(cfg: Config) -> ECGEncoder:
    """The encoder to probe: a StenCE / encoder checkpoint if given, else the configured baseline."""
    path = cfg.downstream.encoder_checkpoint
    if path:
        if torch.load(path, map_location="cpu", weights_only=True).get("kind") == "scorer":
            return load_scorer(path).encoder  # a registered model: its encoder, without the old head
        return load_encoder(path)
    return build_ecg_encoder(cfg)


def build_datasets(cfg: Config, contract: InputContract | None = None) -> dict[str, Any]:
    """Train/val/test sets of the downstream task, under the encoder's input `contract`."""
    d = cfg.downstream
    if d.task == "echonext":
        if not d.echonext_root:
            raise ValueError("task 'echonext' needs downstream.echonext_root")
        return {s: EchoNextDataset(d.echonext_root, s, cfg.data, train=(s == "train"), seed=cfg.train.seed,
                                   contract=contract) for s in ("train", "val", "test")}
    cohort = Cohort.open(cfg.data.cohort)
    return {s: EcgDataset(cohort, s, cfg.data, d.task, train=(s == "train"), seed=cfg.train.seed,
                          fraction=d.train_fraction if s == "train" else 1.0, contract=contract)
            for s in ("train", "val", "test")}


def passes_per_epoch(epochs: int, min_steps: int, steps_per_pass: int) -> int:
    """Passes over the training data per epoch so that `epochs` epochs take at least `min_steps` optimiser
    steps (validation and checkpoints stay once per epoch, so a tiny split does not pay them every step)."""
    return max(1, -(-min_steps // (max(1, epochs) * max(1, steps_per_pass))))


def smoothed_bce(logits: torch.Tensor, y: torch.Tensor, smoothing: float) -> torch.Tensor:
    """BCE with label smoothing; NaN labels (unknown EchoNext flags) are masked out."""
    mask = ~torch.isnan(y)  # (B, K)
    y = torch.nan_to_num(y) * (1 - smoothing) + 0.5 * smoothing
    loss = F.binary_cross_entropy_with_logits(logits, y, reduction="none")
    return (loss * mask).sum() / mask.sum().clamp(min=1)


def mean_auroc(y: np.ndarray, p: np.ndarray) -> float:
    """Mean over label columns of the per-column AUROC (each column scored against its own labels)."""
    vals = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for k in range(y.shape[1]):
            keep = ~np.isnan(y[:, k])
            vals.append(auroc(y[keep, k], p[keep, k]))
    vals = [v for v in vals if np.isfinite(v)]
    return float(np.mean(vals)) if vals else float("nan")


def downstream_loop(loop_config: dict[str, Any]) -> None:
    ctx = loop_setup(loop_config)
    cfg, info, tracker, d = ctx.cfg, ctx.info, ctx.tracker, ctx.cfg.downstream
    encoder = load_downstream_encoder(cfg)
    sets = build_datasets(cfg, encoder.contract)
    model = build_downstream_model(cfg, encoder, n_out=sets["train"].labels.reshape(
        len(sets["train"]), -1).shape[1])
    model = wrap_model(model, info)
    core = unwrap(model)
    head_ids = {id(p) for p in core.head.parameters()}
    groups = []
    for g in param_groups(core, d.lr_head, d.weight_decay):
        for is_head, lr in ((True, d.lr_head), (False, d.lr_backbone)):
            ps = [p for p in g["params"] if (id(p) in head_ids) == is_head]
            if ps:
                groups.append(dict(g, params=ps, lr=lr))
    opt = torch.optim.AdamW(groups)
    loader, sampler = train_loader(sets["train"], d.batch_size, info, None, cfg.train.seed, cfg.data.num_workers)
    steps = max(1, len(loader))
    passes = passes_per_epoch(d.epochs, d.min_steps, len(loader))
    if passes > 1:
        print0(f"{steps} steps per pass: {passes} passes per epoch for downstream.min_steps={d.min_steps}")
    steps *= passes
    sched = warmup_cosine(opt, d.warmup_epochs * steps, d.epochs * steps, cfg.optim.warmup_start, cfg.optim.min_lr)

    frozen_feats: dict[str, list[tuple[np.ndarray, torch.Tensor, np.ndarray]]] = {}

    def eval_inputs(split: str):
        """(index, encoder input or, for a frozen encoder, its cached embedding, labels) per batch of this
        rank's shard; evaluation inputs are not augmented, so a frozen encoder's embeddings are computed once."""
        if split in frozen_feats:
            return frozen_feats[split]
        items = []
        for b in shard_loader(sets[split], d.batch_size, info, None):
            x = b["ecg"].to(info.device)  # (B, 12, T)
            if core.freeze_encoder:
                with torch.no_grad(), autocast(info):
                    x = core.encoder(x)  # (B, D)
            items.append((b["index"].numpy(), x, b["label"].reshape(len(b["index"]), -1).numpy()))
        if core.freeze_encoder:
            frozen_feats[split] = items
        return items

    def predict(split: str) -> dict[str, np.ndarray]:
        model.eval()

        def batches():
            with torch.no_grad():
                for index, x, y in eval_inputs(split):
                    with autocast(info):
                        logits = (core.head(x) if core.freeze_encoder else core(x)).float()  # (B, K)
                    yield {"index": index, "p": torch.sigmoid(logits).cpu().numpy(), "y": y}
        return gather_outputs(batches())

    start, best, best_state = 0, -1.0, None
    state = load_latest_state(map_location=info.device)
    if state is not None:
        core.load_state_dict(state["model"])
        opt.load_state_dict(state["optim"])
        sched.load_state_dict(state["sched"])
        start, best, best_state = int(state["epoch"]), float(state["best"]), state["best_model"]
        tracker.refill(state.get("tracked"))  # its metrics, had the restart come before they were logged

    def train_batches(epoch: int):
        for k in range(passes):  # a fresh shuffle (and augmentation draw) per pass
            set_epoch(sampler, [sets["train"]], epoch * passes + k, cfg.train.seed)
            yield from loader

    for epoch in range(start, d.epochs):
        model.train()
        total, n = 0.0, 0
        for batch in train_batches(epoch):
            batch = to_device(batch, info.device)
            with autocast(info):
                logits = model(batch["ecg"]).float()
            loss = smoothed_bce(logits, batch["label"].reshape(logits.shape), d.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(logits)
            n += len(logits)
        metrics = all_reduce_mean({"train/loss": total / max(n, 1)}, weight=n)
        val = predict("val")
        metrics[DOWNSTREAM_METRIC] = mean_auroc(val["y"], val["p"])
        if np.isfinite(metrics[DOWNSTREAM_METRIC]) and metrics[DOWNSTREAM_METRIC] > best:
            best, best_state = metrics[DOWNSTREAM_METRIC], copy.deepcopy(core.state_dict())
        metrics.update({"epoch": epoch + 1, "val/best_auroc": best, "train/passes_per_epoch": passes})
        print0(f"epoch {epoch + 1}/{d.epochs} loss={metrics['train/loss']:.4f} val_auroc={metrics['val/auroc']:.3f}")
        ckpt = None
        if info.rank == 0:
            ckpt = {"model": core.state_dict(), "optim": opt.state_dict(), "sched": sched.state_dict(),
                    "epoch": epoch + 1, "best": best, "best_model": best_state or core.state_dict(),
                    "config": loop_config["config"], "tracked": tracker.stamp(metrics, step=epoch + 1)}
        report(metrics, ckpt)  # the checkpoint first: a tracking store that is down never costs an epoch
        tracker.log_metrics(metrics, step=epoch + 1)

    # the test split, read once, with the weights selected on validation
    if best_state is not None:
        core.load_state_dict(best_state)
    val, test = predict("val"), predict("test")
    final = {"epoch": d.epochs + 1, DOWNSTREAM_METRIC: best, "final": 1.0}
    ckpt = None
    if info.rank == 0:
        ckpt = {"model": core.state_dict(), "optim": opt.state_dict(), "sched": sched.state_dict(),
                "epoch": d.epochs, "best": best, "best_model": core.state_dict(), "config": loop_config["config"],
                "test": {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in test.items()},
                "val": {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in val.items()}}
    report(final, ckpt)
    tracker.close()
