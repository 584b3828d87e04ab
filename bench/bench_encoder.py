"""Forward+backward throughput of the OTIS-base ECG encoder on 3 s x 500 Hz (1500 samples) on this CPU.

Reports achieved FLOP/s against the machine's own fp32 matmul peak (measured in the same run) and against
a plain stack of nn.TransformerEncoderLayer of the same width, depth and token count. FLOPs are counted
analytically (2 per multiply-add, backward = 2 x forward); the count is cross-checked against
torch.utils.flop_counter, which does not see the CPU flash-attention kernel.

Attention variants of the same OTIS weights (see stence.models.otis.OtisAttention):
  mha_weights  the public OTIS call: nn.MultiheadAttention(q, k, v) with its default need_weights=True
  mha          the same call with need_weights=False (lets MultiheadAttention use SDPA)
  sdpa         in-projections by hand + F.scaled_dot_product_attention
  fused        stacked linear maps multiplied out first (exact algebra): 4 instead of 8 D x D matmuls per token

Times are the best of interleaved rounds. By default one thread and process CPU time are used, which
stay meaningful on a machine shared with other jobs; `--clock wall --threads N` measures elapsed time
on a quiet machine. The peak is measured with the same clock and threads.

Usage: python bench/bench_encoder.py [--batch 2] [--rounds 3] [--threads 1] [--clock cpu|wall]
                                     [--out bench/results/encoder.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
import types
from pathlib import Path

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from stence.models.registry import create_ecg_encoder

T_SAMPLES, PATCH = 1500, 24


def matmul_peak(clock, n: int = 2048, seconds: float = 3.0) -> float:
    """Best fp32 FLOP/s of a large square torch.matmul over ~`seconds` of wall time."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(2):
        a @ b
    best, t_end = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < t_end:
        t0 = clock()
        a @ b
        best = max(best, 2 * n**3 / (clock() - t0))
    return best


def block_flops(tokens: int, D: int, hidden: int, projections: int) -> float:
    """Forward FLOPs of one pre-norm block per sample: `projections` D x D matmuls per token, attention, MLP."""
    return tokens * (2 * projections * D * D + 4 * tokens * D + 4 * D * hidden)


def model_flops(tokens: int, D: int, depth: int, projections: int) -> float:
    """Forward + backward FLOPs per sample (backward = 2 x forward), patch embedding included."""
    fwd = depth * block_flops(tokens, D, 4 * D, projections) + (tokens - 1) * 2 * PATCH * D
    return 3 * fwd


def counted_flops(step) -> int:
    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops()


def public_mha_forward(self, x: torch.Tensor) -> torch.Tensor:
    """The public OTIS attention call, need_weights left at its default (True)."""
    q, k, v = self.qkv(x).chunk(3, dim=-1)
    return self.proj(self.mha(q, k, v)[0])


def make_step(model: nn.Module, x: torch.Tensor):
    def step() -> None:
        out = model(x)
        out.float().pow(2).mean().backward()
        model.zero_grad(set_to_none=True)

    return step


def set_variant(enc: nn.Module, variant: str) -> None:
    enc.set_attn_impl("mha" if variant == "mha_weights" else variant)
    for blk in enc.blocks:
        if variant == "mha_weights":
            blk.attn.forward = types.MethodType(public_mha_forward, blk.attn)
        elif "forward" in blk.attn.__dict__:
            del blk.attn.forward


VARIANTS = ("mha_weights", "mha", "sdpa", "fused", "plain")
# D x D matmuls per token and block: qkv 3 + in-projection 3 + out-projection 1 + proj 1 as defined;
# 4 once multiplied out (fused) and in nn.TransformerEncoderLayer (in-projection 3 + out 1)
PROJECTIONS = {"mha_weights": 8, "mha": 8, "sdpa": 8, "fused": 4, "plain": 4}


def build(batch: int) -> tuple[nn.Module, dict, dict]:
    """OTIS-base, a plain TransformerEncoder of the same size, one fwd+bwd step function per variant."""
    enc = create_ecg_encoder("otis_base", fs=500, n_samples=T_SAMPLES).train()
    dims = {"D": enc.embed_dim, "depth": len(enc.blocks), "heads": enc.blocks[0].attn.num_heads}
    dims["tokens"] = 1 + 12 * (T_SAMPLES // PATCH)
    layer = nn.TransformerEncoderLayer(
        dims["D"],
        dims["heads"],
        4 * dims["D"],
        dropout=0.0,
        activation="gelu",
        batch_first=True,
        norm_first=True,
    )
    plain = nn.TransformerEncoder(layer, dims["depth"], enable_nested_tensor=False).train()
    steps = {v: make_step(enc, torch.randn(batch, 12, T_SAMPLES)) for v in VARIANTS[:-1]}
    steps["plain"] = make_step(plain, torch.randn(batch, dims["tokens"], dims["D"]))
    return enc, steps, dims


def time_rounds(enc: nn.Module, steps: dict, clock, rounds: int) -> tuple[dict[str, float], float]:
    """Best step time per variant and the best matmul peak, interleaved over rounds (round 0 warms up),
    so a burst of foreign load on a shared machine does not land on one variant only."""
    best = dict.fromkeys(VARIANTS, float("inf"))
    peak = 0.0
    for r in range(rounds + 1):
        peak = max(peak, matmul_peak(clock, seconds=1.0))
        for v in VARIANTS:
            if v != "plain":
                set_variant(enc, v)
            t0 = clock()
            steps[v]()
            if r > 0:
                best[v] = min(best[v], clock() - t0)
        print(f"round {r}: " + "  ".join(f"{v} {best[v]:.2f}s" for v in VARIANTS), flush=True)
    return best, peak


def tabulate(best: dict[str, float], peak: float, dims: dict, batch: int) -> dict[str, dict]:
    D, depth, tokens = dims["D"], dims["depth"], dims["tokens"]
    results: dict[str, dict] = {}
    for v in VARIANTS:
        executed = model_flops(tokens, D, depth, PROJECTIONS[v]) * batch
        if v == "plain":  # no patch embedding
            executed -= 3 * (tokens - 1) * 2 * PATCH * D * batch
        if v == "fused":  # composing the weights: (3, D, D) @ (3, D, D) and (D, D) @ (D, D) per block
            executed += 3 * depth * 8 * D**3
        results[v] = {
            "sec_per_step": best[v],
            "samples_per_s": batch / best[v],  # per CPU-second with --clock cpu
            "executed_flops_per_step": executed,
            "achieved_flops": executed / best[v],
            "fraction_of_peak": executed / best[v] / peak,
        }
        if v != "plain":  # the unfused OTIS architecture's work per second
            results[v]["architecture_flops_per_s"] = model_flops(tokens, D, depth, 8) * batch / best[v]
    return results


def summarise(results: dict[str, dict], peak: float, counted: float) -> dict[str, float]:
    fused, plain, public = results["fused"], results["plain"], results["mha_weights"]
    return {
        "peak_matmul_flops": peak,
        "fused_fraction_of_peak": fused["fraction_of_peak"],
        "fused_architecture_fraction_of_peak": fused["architecture_flops_per_s"] / peak,
        "public_mha_fraction_of_peak": public["fraction_of_peak"],
        "plain_fraction_of_peak": plain["fraction_of_peak"],
        "fused_vs_plain_flops": fused["achieved_flops"] / plain["achieved_flops"],
        "fused_vs_plain_samples": fused["samples_per_s"] / plain["samples_per_s"],
        "fused_vs_public_mha_samples": fused["samples_per_s"] / public["samples_per_s"],
        "analytic_vs_counted_flops": fused["executed_flops_per_step"] / counted,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds; the fastest is kept")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument(
        "--clock",
        choices=("cpu", "wall"),
        default="cpu",
        help="cpu: process CPU time, robust on a shared machine (use with --threads 1, as idle OpenMP "
        "threads spin); wall: elapsed time, for a quiet machine (e.g. --threads $(nproc))",
    )
    ap.add_argument("--out", default="bench/results/encoder.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter

    enc, steps, dims = build(args.batch)
    best, peak = time_rounds(enc, steps, clock, args.rounds)
    results = tabulate(best, peak, dims, args.batch)
    # cross-check of the analytic count: flop_counter misses the CPU flash-attention kernel, add its share
    set_variant(enc, "fused")
    attn = 3 * dims["depth"] * 4 * dims["tokens"] ** 2 * dims["D"] * args.batch
    counted = counted_flops(steps["fused"]) + attn
    results["fused"]["flop_counter_plus_attention"] = counted
    summary = summarise(results, peak, counted)

    print(
        f"matmul peak {peak / 1e9:.1f} GFLOP/s ({args.threads} thread(s), {args.clock} clock), "
        f"batch {args.batch}, {dims['tokens']} tokens"
    )
    for v, res in results.items():
        print(
            f"  {v:12s} {res['sec_per_step']:6.2f} s/step {res['samples_per_s']:6.2f} samples/s "
            f"{res['achieved_flops'] / 1e9:7.1f} GFLOP/s = {100 * res['fraction_of_peak']:5.1f} % of peak"
        )
    for k, v in summary.items():
        if k != "peak_matmul_flops":
            print(f"  {k:36s} {v:6.3f}")
    setup = {
        "model": "otis_base",
        "batch": args.batch,
        "samples": T_SAMPLES,
        **dims,
        "threads": args.threads,
        "clock": args.clock,
        "rounds": args.rounds,
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "load_avg_1m": os.getloadavg()[0],
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"setup": setup, "results": results, "summary": summary}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
