"""`pretrain_step`, the one training step of stage B that the loop and bench/bench_train.py both run, does
exactly what the loop's inline step did: same operations in the same order, hence the same weights."""

from __future__ import annotations

import torch
from torch import nn

from stence.config import Config, apply_overrides
from stence.losses import StenceLoss
from stence.models.registry import build_stence_model
from stence.train.pretrain_loop import pretrain_step, tower_optimizers, tower_schedulers
from stence.train.worker import WorkerInfo
from tests.test_models import batch_for

CPU = WorkerInfo(0, 1, 0, torch.device("cpu"))


def _setup(cfg: Config):
    torch.manual_seed(0)
    model = build_stence_model(cfg).train()
    named = tower_optimizers(model, cfg)
    return model, named, tower_schedulers(named, cfg, steps_per_epoch=3)


def _inline_step(model, loss_fn, batch, named, schedulers, grad_clip):
    """The step as pretrain_loop wrote it inline before `pretrain_step` existed."""
    terms = loss_fn(model(batch), batch)
    for _, o in named:
        o.zero_grad(set_to_none=True)
    terms["loss"].backward()
    if grad_clip > 0:
        nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    for (_, o), s in zip(named, schedulers, strict=True):
        o.step()
        s.step()
    return terms


def test_pretrain_step_matches_the_inline_step() -> None:
    cfg = apply_overrides(Config(), {"model.ecg": "echoingecg_tiny", "loss.learnable_temperature": True,
                                     "optim.grad_clip": 0.5, "optim.warmup_epochs": 1, "optim.epochs": 2})
    loss_fn = StenceLoss(cfg.loss.w_sten, gather=False)
    batch = batch_for(cfg)
    ref, ref_opt, ref_sched = _setup(cfg)
    new, new_opt, new_sched = _setup(cfg)
    for _ in range(3):
        torch.manual_seed(1)  # dropout draws: the same stream for both
        want = _inline_step(ref, loss_fn, batch, ref_opt, ref_sched, cfg.optim.grad_clip)
        torch.manual_seed(1)
        got = pretrain_step(new, loss_fn, batch, [o for _, o in new_opt], new_sched, CPU, cfg.optim.grad_clip)
        assert set(got) == set(want) and "loss" in got
        for k in want:
            assert torch.equal(got[k].detach(), want[k].detach()), k
    for (name, a), b in zip(ref.state_dict().items(), new.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert [s.get_last_lr() for s in ref_sched] == [s.get_last_lr() for s in new_sched]


def test_pretrain_step_without_schedulers_steps_the_optimisers() -> None:
    cfg = apply_overrides(Config(), {"model.ecg": "echoingecg_tiny"})
    model, named, _ = _setup(cfg)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    terms = pretrain_step(model, StenceLoss(cfg.loss.w_sten, gather=False), batch_for(cfg),
                          [o for _, o in named], None, CPU)
    assert terms["loss"].requires_grad and torch.isfinite(terms["loss"])
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
