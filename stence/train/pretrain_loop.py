"""Stage B, per-worker loop: StenCE contrastive pretraining of the ECG encoder against the angiography tower.

Two AdamW optimisers (ECG tower + head + temperature; angiography tower + head), per-step warm-up then
cosine, DDP with negatives gathered across workers, an all-reduced validation every epoch (CLIP loss,
recall@1/5 both ways) and a kNN probe on the downstream task every `train.knn_every` epochs. Every
epoch ends in a checkpoint (model, optimisers, schedulers, epoch, kNN history, resolved config), ranked by
the mean of the last `train.knn_smooth` kNN AUROCs, and only then are its metrics logged to MLflow.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from stence.config import Config
from stence.data.cohort_io import Cohort
from stence.data.datasets import EcgDataset, PairedDataset, collate_paired
from stence.data.feature_store import FeatureStore
from stence.eval.metrics import knn_auroc_ci
from stence.losses import StenceLoss
from stence.models.registry import build_stence_model
from stence.train.common import (
    autocast,
    ddp_diagnostics,
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
from stence.train.worker import (
    WorkerInfo,
    all_reduce_mean,
    load_latest_state,
    print0,
    report,
    report_restored,
)

KNN_METRIC = "val/knn_auroc"  # the latest kNN probe AUROC
KNN_LO, KNN_HI = "val/knn_auroc_lo", "val/knn_auroc_hi"  # its DeLong 95 % interval
SELECT_METRIC = "val/knn_auroc_smooth"  # mean of the last train.knn_smooth of them: ranks checkpoints and trials


def smoothed(history: list[float], n: int) -> float:
    """Mean of the last n values (all of them while fewer); 0.0 for none, so an unscored run ranks last."""
    recent = history[-max(1, n):]
    return float(np.mean(recent)) if recent else 0.0


def tower_optimizers(core: nn.Module, cfg: Config) -> list[tuple[str, torch.optim.Optimizer]]:
    """One AdamW per tower; norms, biases, embeddings and the temperature get no weight decay."""
    ecg_ids = {id(p) for m in (core.ecg_encoder, core.ecg_proj) for p in m.parameters()}
    if isinstance(core.logit_scale, nn.Parameter):
        ecg_ids.add(id(core.logit_scale))
    out = []
    for name, lr, pick in (("ecg", cfg.optim.lr_ecg, lambda p: id(p) in ecg_ids),
                           ("angio", cfg.optim.lr_angio, lambda p: id(p) not in ecg_ids)):
        groups = [dict(g, params=[p for p in g["params"] if pick(p)])
                  for g in param_groups(core, lr, cfg.optim.weight_decay)]
        groups = [g for g in groups if g["params"]]
        if groups:  # the frozen-aggregator ablation can leave a tower with only its head
            out.append((name, torch.optim.AdamW(groups, lr=lr)))
    return out


def tower_schedulers(optimizers: list[tuple[str, torch.optim.Optimizer]], cfg: Config,
                     steps_per_epoch: int) -> list[LambdaLR]:
    """Per-step warm-up then cosine, one scheduler per tower optimiser (same order)."""
    return [warmup_cosine(o, cfg.optim.warmup_epochs * steps_per_epoch, cfg.optim.epochs * steps_per_epoch,
                          cfg.optim.warmup_start, cfg.optim.min_lr) for _, o in optimizers]


def pretrain_step(model: nn.Module, loss_fn: StenceLoss, batch: dict[str, torch.Tensor],
                  optimizers: list[torch.optim.Optimizer], schedulers: list[LambdaLR] | None, info: WorkerInfo,
                  grad_clip: float = 0.0) -> dict[str, torch.Tensor]:
    """One training step on a batch already on `info.device`: forward and loss terms (bf16 autocast on GPU),
    zero the gradients, backward of `loss`, clip the gradient norm (`grad_clip` > 0), then each optimiser
    steps, followed by its scheduler (`schedulers` in the same order; None = no schedulers). Returns the loss
    terms (`loss` is the one backpropagated). Used by `pretrain_loop` and bench/bench_train.py."""
    with autocast(info):
        terms = loss_fn(model(batch), batch)
    for o in optimizers:
        o.zero_grad(set_to_none=True)
    terms["loss"].backward()
    if grad_clip > 0:
        nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    for o, s in zip(optimizers, schedulers if schedulers is not None else [None] * len(optimizers), strict=True):
        o.step()
        if s is not None:
            s.step()
    return terms


_BLOCK_ROWS = 1024  # rows of the (N, N) validation similarity matrix held at a time ...
_BLOCK_ELEMS = 1 << 23  # ... and at most this many entries (32 MB of float32), whatever N


def _row_blocks(n: int) -> list[tuple[int, int]]:
    """[start, stop) row ranges covering n rows, each of at most min(_BLOCK_ROWS, _BLOCK_ELEMS // n) rows."""
    step = max(1, min(_BLOCK_ROWS, _BLOCK_ELEMS // max(n, 1)))
    return [(i, min(i + step, n)) for i in range(0, n, step)]


def retrieval_metrics(ecg: np.ndarray, angio: np.ndarray, scale: float) -> dict[str, float]:
    """Validation CLIP loss and recall@1/5 in both directions on the whole (gathered) validation set.

    The (N, N) similarity matrix `ecg @ angio.T` is never held whole: it is made a block of rows at a time
    (see `_row_blocks`; memory bounded whatever N), twice. The first pass takes each row's rank (how many
    similarities strictly beat the true partner's), the diagonal, and the row and running column
    logsumexps of the logits (`clip_loss` on the full matrix, to float tolerance); the second counts, per
    column, the similarities above that column's diagonal entry (the angiography -> ECG rank)."""
    e, a = torch.from_numpy(ecg), torch.from_numpy(angio)  # (N, D) each
    n = len(e)
    logit_scale = torch.tensor(scale)  # float32, as clip_loss gets it
    blocks = _row_blocks(n)
    dtype = torch.result_type(e, a)
    diag = torch.empty(n, dtype=dtype)  # (N,) similarity of each true pair
    rank_e2a = torch.empty(n, dtype=torch.long)  # (N,) how many angiograms beat each ECG's partner
    row_lse = torch.empty(n, dtype=torch.float64)  # (N,) logsumexp over each row of the logits
    col_lse = torch.full((n,), -math.inf, dtype=torch.float64)  # (N,) running logsumexp over each column
    for i0, i1 in blocks:
        s = e[i0:i1] @ a.T  # (b, N) rows i0..i1 of the similarity matrix
        r = torch.arange(i1 - i0)
        d = s[r, i0 + r]  # (b,) their diagonal entries
        diag[i0:i1] = d
        rank_e2a[i0:i1] = (s > d[:, None]).sum(1)
        logits = s * logit_scale  # (b, N)
        row_lse[i0:i1] = torch.logsumexp(logits, 1).double()
        col_lse = torch.logaddexp(col_lse, torch.logsumexp(logits, 0).double())
        del s, logits
    rank_a2e = torch.zeros(n, dtype=torch.long)  # (N,) how many ECGs beat each angiogram's partner
    for i0, i1 in blocks:
        s = e[i0:i1] @ a.T  # (b, N), the same block as in the first pass
        rank_a2e += (s > diag[None, :]).sum(0)
        del s
    diag_logits = (diag * logit_scale).double()  # (N,)
    ce_e2a = (row_lse - diag_logits).mean()  # cross-entropy of each row against its diagonal
    ce_a2e = (col_lse - diag_logits).mean()  # and of each column
    out = {"val/clip_loss": float((ce_e2a + ce_a2e) / 2)}
    for name, rank in (("e2a", rank_e2a), ("a2e", rank_a2e)):
        out[f"val/r1_{name}"] = float((rank < 1).float().mean())
        out[f"val/r5_{name}"] = float((rank < 5).float().mean())
    return out


@torch.no_grad()
def embed_ecgs(core: nn.Module, ds, info, batch: int) -> dict[str, np.ndarray]:
    """ECG projections (L2-normalised) of a dataset, gathered from every rank, ordered by index."""
    def batches():
        for b in shard_loader(ds, batch, info, None):
            with autocast(info):
                z = core.encode_ecg(b["ecg"].to(info.device)).float()
            yield {"index": b["index"].numpy(), "z": z.cpu().numpy()}
    return gather_outputs(batches())


def pretrain_loop(loop_config: dict[str, Any]) -> None:
    ctx = loop_setup(loop_config)
    cfg, info, tracker = ctx.cfg, ctx.info, ctx.tracker
    cohort = Cohort.open(cfg.data.cohort)
    store = FeatureStore.open(loop_config["features_dir"])
    model = wrap_model(build_stence_model(cfg), info, find_unused=cfg.loss.w_sten == 0)
    core = unwrap(model)
    contract = core.ecg_encoder.contract  # every ECG reaches the encoder the way its contract says
    train_ds = PairedDataset(cohort, "train", cfg.data, store, train=True, seed=cfg.train.seed, contract=contract)
    val_ds = PairedDataset(cohort, "val", cfg.data, store, train=False, contract=contract)
    knn_sets = [EcgDataset(cohort, s, cfg.data, cfg.train.knn_task, contract=contract) for s in ("train", "val")]
    loader, sampler = train_loader(train_ds, cfg.optim.batch_size, info, collate_paired, cfg.train.seed,
                                   cfg.data.num_workers)
    loss_fn = StenceLoss(cfg.loss.w_sten, gather=cfg.loss.gather)
    optimizers = tower_optimizers(core, cfg)
    schedulers = tower_schedulers(optimizers, cfg, max(1, len(loader)))
    tower_opts = [o for _, o in optimizers]
    start, knn_history, reported = 0, [], []  # one kNN AUROC per kNN probe so far; each epoch's metrics
    knn_ci = {KNN_LO: math.nan, KNN_HI: math.nan}  # the latest probe's interval
    state = load_latest_state(map_location=info.device)
    if state is not None:  # resuming: same run name, or a restarted worker group
        core.load_state_dict(state["model"])
        for (name, o), s in zip(optimizers, schedulers, strict=True):
            o.load_state_dict(state["optim"][name])
            s.load_state_dict(state["sched"][name])
        start, knn_history = int(state["epoch"]), list(state.get("knn_history", []))
        tracker.refill(state.get("tracked"))  # its metrics, had the restart come before they were logged
        reported = list(state.get("reported", []))
        knn_ci = {k: reported[-1].get(k, math.nan) for k in knn_ci} if reported else knn_ci
        report_restored(reported, start)  # and to Tune, had the sweep driver died before it processed them
        print0(f"resuming from epoch {start}")

    for epoch in range(start, cfg.optim.epochs):
        set_epoch(sampler, [train_ds], epoch, cfg.train.seed)
        model.train()
        sums: dict[str, float] = {}
        n = 0
        for batch in loader:
            batch = to_device(batch, info.device)
            terms = pretrain_step(model, loss_fn, batch, tower_opts, schedulers, info, cfg.optim.grad_clip)
            b = batch["ecg"].shape[0]
            n += b
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach()) * b
        metrics = all_reduce_mean({f"train/{k}": v / max(n, 1) for k, v in sums.items()}, weight=n)

        model.eval()
        with torch.no_grad():
            def val_batches():
                for b in shard_loader(val_ds, cfg.optim.batch_size, info, collate_paired):
                    b = to_device(b, info.device)
                    with autocast(info):
                        out = core(b)
                    yield {"index": b["index"].cpu().numpy(), "e": out["ecg_features"].float().cpu().numpy(),
                           "a": out["angio_features"].float().cpu().numpy()}
            val = gather_outputs(val_batches())
            scale = float(core.logit_scale.exp().clamp(max=100.0))
        metrics.update(retrieval_metrics(val["e"], val["a"], scale))
        metrics["train/temperature"] = 1.0 / scale
        metrics.update(ddp_diagnostics(model))
        if (epoch + 1) % cfg.train.knn_every == 0 or epoch + 1 == cfg.optim.epochs:
            tr, va = (embed_ecgs(core, ds, info, cfg.optim.batch_size) for ds in knn_sets)
            probe = knn_auroc_ci(tr["z"], knn_sets[0].labels[tr["index"]], va["z"],
                                 knn_sets[1].labels[va["index"]], k=cfg.train.knn_k)
            knn = probe["auroc"]
            # an undefined AUROC (a class missing) counts as 0: such a run ranks last
            knn_history.append(knn if math.isfinite(knn) else 0.0)
            knn_ci = {KNN_LO: probe["auroc_lo"], KNN_HI: probe["auroc_hi"]}
        metrics[KNN_METRIC] = knn_history[-1] if knn_history else 0.0  # the latest probe's, between probes
        metrics.update(knn_ci)  # its DeLong 95 % interval (NaN while none or undefined)
        metrics[SELECT_METRIC] = smoothed(knn_history, cfg.train.knn_smooth)
        metrics["epoch"] = epoch + 1
        print0(f"epoch {epoch + 1}/{cfg.optim.epochs} " + " ".join(
            f"{k}={v:.4f}" for k, v in metrics.items() if k.startswith("val/") or k == "train/loss"))
        reported.append({k: float(v) for k, v in metrics.items()})  # replayed to Tune after a restore
        ckpt = None
        if info.rank == 0:
            ckpt = {"model": core.state_dict(), "optim": {k: o.state_dict() for k, o in optimizers},
                    "sched": {k: s.state_dict() for (k, _), s in zip(optimizers, schedulers, strict=True)},
                    "epoch": epoch + 1, "knn_history": knn_history, "reported": reported,
                    "config": loop_config["config"],
                    "tracked": tracker.stamp(metrics, step=epoch + 1)}
        report(metrics, ckpt, iteration=epoch + 1)  # the checkpoint first: a tracking store that is down never costs an epoch
        tracker.log_metrics(metrics, step=epoch + 1)
    tracker.close()
