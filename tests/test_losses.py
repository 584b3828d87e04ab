"""CLIP and stenosis losses against hand-written formulas, and the gathered loss on two real processes."""

from __future__ import annotations

import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from stence.config import Config, apply_overrides
from stence.losses import StenceLoss, clip_loss, gather_features, stenosis_loss
from stence.models.registry import build_stence_model

pytestmark = pytest.mark.usefixtures("one_thread")  # small models: no OpenMP spinning (conftest)


def unit(B, D, seed):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(B, D, generator=g, dtype=torch.float64), dim=-1)


def clip_reference(e: np.ndarray, a: np.ndarray, scale: float) -> float:
    """-1/2 [mean_i log softmax_j(s e_i.a_j)[i] + mean_j log softmax_i(s e_i.a_j)[j]] with NumPy."""
    s = scale * e @ a.T
    row = s - np.log(np.exp(s).sum(axis=1, keepdims=True))
    col = s - np.log(np.exp(s).sum(axis=0, keepdims=True))
    n = len(e)
    return float(-(np.trace(row) / n + np.trace(col) / n) / 2)


def test_clip_loss_matches_reference_and_is_symmetric():
    e, a = unit(6, 8, 0), unit(6, 8, 1)
    scale = torch.tensor(5.0, dtype=torch.float64)
    got = clip_loss(e, a, scale)
    assert got.item() == pytest.approx(clip_reference(e.numpy(), a.numpy(), 5.0), rel=1e-12)
    assert clip_loss(a, e, scale).item() == pytest.approx(got.item(), rel=1e-12)
    assert gather_features(e) is e  # identity on one process


def test_aligned_pairs_score_lower_than_shuffled():
    e = unit(16, 32, 2)
    a = F.normalize(e + 0.1 * unit(16, 32, 3), dim=-1)
    scale = torch.tensor(1 / 0.2, dtype=torch.float64)
    assert clip_loss(e, a, scale) < clip_loss(
        e, a[torch.randperm(16, generator=torch.Generator().manual_seed(0))], scale
    )


def test_stenosis_loss_weights():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 11, generator=g, dtype=torch.float64)
    targets = torch.randint(0, 2, (5, 11), generator=g).double()
    x, y = logits.numpy(), targets.numpy()
    bce = np.maximum(x, 0) - x * y + np.log1p(np.exp(-np.abs(x)))  # (5, 11)
    expected = (
        0.4 * bce[:, 0].mean() + 0.4 * (bce[:, 1].mean() + bce[:, 2].mean()) / 2 + 0.2 * bce[:, 3:].mean()
    )
    out = stenosis_loss(logits, targets)
    assert out["sten_loss"].item() == pytest.approx(expected, rel=1e-12)
    assert out["sten_patient"].item() == pytest.approx(bce[:, 0].mean(), rel=1e-12)
    # a change in one segment's logit moves only the segment term, by 0.2 / (B * 8) of its BCE change
    logits2 = logits.clone()
    logits2[0, 7] += 3.0
    out2 = stenosis_loss(logits2, targets)
    assert out2["sten_patient"] == out["sten_patient"] and out2["sten_artery"] == out["sten_artery"]
    delta = F.binary_cross_entropy_with_logits(
        logits2[0, 7], targets[0, 7]
    ) - F.binary_cross_entropy_with_logits(logits[0, 7], targets[0, 7])
    assert (out2["sten_loss"] - out["sten_loss"]).item() == pytest.approx(0.2 * delta.item() / 40, rel=1e-9)
    with pytest.raises(ValueError):
        stenosis_loss(logits[:, :10], targets[:, :10])


def small_model_and_batch():
    torch.manual_seed(0)
    cfg = apply_overrides(Config(), {"model.ecg": "echoingecg_tiny", "model.angio_layers": 1})
    model = build_stence_model(cfg)
    g = torch.Generator().manual_seed(0)
    batch = {
        "ecg": torch.randn(4, 12, 1500, generator=g),
        "angio_feats": torch.randn(4, 2, 16, 64, generator=g),
        "view_mask": torch.tensor([[True, True], [True, False], [True, True], [True, False]]),
        "angles": torch.randn(4, 2, 2, generator=g) * 30,
        "targets": torch.randint(0, 2, (4, 11), generator=g).float(),
    }
    return model, batch


@pytest.mark.parametrize("w_sten", [0.0, 0.3, 1.0])
def test_stence_loss_combination(w_sten):
    model, batch = small_model_and_batch()
    out = model(batch)
    terms = StenceLoss(w_sten)(out, batch)
    clip = clip_loss(out["ecg_features"], out["angio_features"], out["logit_scale"])
    sten = stenosis_loss(out["stenosis_logits"], batch["targets"])["sten_loss"]
    torch.testing.assert_close(terms["clip_loss"], clip)
    torch.testing.assert_close(terms["sten_loss"], sten)
    torch.testing.assert_close(terms["loss"], clip + w_sten * sten)
    terms["loss"].backward()
    head_grad = model.aggregator.sten_head.weight.grad
    if w_sten == 0:
        assert head_grad is None  # the term is removed, not just scaled
        assert not terms["sten_loss"].requires_grad
    else:
        assert head_grad is not None and head_grad.abs().sum() > 0


def test_ecg_encoder_gets_no_gradient_from_the_stenosis_term():
    model, batch = small_model_and_batch()
    out = model(batch)
    stenosis_loss(out["stenosis_logits"], batch["targets"])["sten_loss"].backward()
    ecg_grads = [
        n
        for n, p in model.named_parameters()
        if n.startswith(("ecg_encoder.", "ecg_proj.")) and p.grad is not None
    ]
    assert ecg_grads == []
    assert model.aggregator.queries.grad is not None and model.aggregator.queries.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------------
# two real processes: gloo on 127.0.0.1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        B, n_in, D = 3, 5, 4
        g = torch.Generator().manual_seed(0)  # every rank draws the same full batch and weights
        x_e, x_a = torch.randn(world * B, n_in, generator=g), torch.randn(world * B, n_in, generator=g)
        w_e, w_a = torch.randn(n_in, D, generator=g), torch.randn(n_in, D, generator=g)
        scale = torch.tensor(3.0)
        sl = slice(rank * B, (rank + 1) * B)
        results = {}
        for local_loss in (True, False):
            we, wa = w_e.clone().requires_grad_(), w_a.clone().requires_grad_()
            e, a = F.normalize(x_e[sl] @ we, dim=-1), F.normalize(x_a[sl] @ wa, dim=-1)
            loss = clip_loss(e, a, scale, gather=True, local_loss=local_loss)
            loss.backward()
            grads = torch.cat([we.grad.flatten(), wa.grad.flatten()])
            dist.all_reduce(grads)  # DDP averages gradients across workers
            grads /= world
            mean_loss = loss.detach().clone()
            dist.all_reduce(mean_loss)
            mean_loss /= world
            # single process on the concatenated batch (no gather: the whole batch is local)
            we1, wa1 = w_e.clone().requires_grad_(), w_a.clone().requires_grad_()
            ref = clip_loss(
                F.normalize(x_e @ we1, dim=-1), F.normalize(x_a @ wa1, dim=-1), scale, gather=False
            )
            ref.backward()
            ref_grads = torch.cat([we1.grad.flatten(), wa1.grad.flatten()])
            torch.testing.assert_close(mean_loss, ref.detach(), rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(grads, ref_grads, rtol=1e-4, atol=1e-6)
            results[f"local_loss={local_loss}"] = (loss.item(), ref.item())
        torch.save(results, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_gathered_clip_loss_equals_single_process_loss_on_two_processes(tmp_path):
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        res = torch.load(tmp_path / f"rank{rank}.pt")
        assert set(res) == {"local_loss=True", "local_loss=False"}
    # with local_loss each rank sees a different part of the loss; without it both see the global loss
    r0, r1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert r0["local_loss=False"][0] == pytest.approx(r1["local_loss=False"][0])
    assert (r0["local_loss=True"][0] + r1["local_loss=True"][0]) / 2 == pytest.approx(
        r0["local_loss=True"][1], rel=1e-5
    )
