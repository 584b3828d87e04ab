"""GPU check: bf16 OTIS-base StenCE pretraining through Ray Train (one worker, NCCL), frame-feature extraction on a
GPU actor, and the CPU data path that has to feed them; samples/s, achieved TFLOP/s and MFU against the GPU's
bf16 dense peak. Sized to finish inside 8 minutes on one GPU (bench/gpu_check.sh runs it under `timeout 480`).

Parts (each figure measured in this run; a part that fails is reported and the others still run):
  data       the training data path (stence.data.datasets.PairedDataset over a cohort cache and a feature
             store, collate_paired, the loop's own `train_loader`) in a DataLoader with N worker processes:
             samples/s divided by N = samples/s per CPU core. Runs first, before Ray starts (no forking of a
             process that already runs Ray's threads). The cohort is synthetic (`stence synth` "tiny" preset,
             ingested with this config) unless --cohort names one; the feature store (in a temporary folder)
             holds synthetic float16 patch features of the configured shape (written directly: encoding them
             is not what this part measures). The small cohort is cycled through one long epoch, so its
             files sit in the page cache: the figure is the CPU cost of the path, not the disk's.
  pretrain   the platform's driver (`stence.train.driver.fit`, the same TorchTrainer wiring as `stence
             pretrain`) with train.workers=1 and train.gpus=1: Ray chooses the NCCL backend from use_gpu
             (the driver passes no TorchConfig; see the note below), checked in the loop with
             torch.distributed.get_backend() and one all_reduce. The loop builds model, loss, optimisers and
             schedulers as `pretrain_loop` does and times `pretrain_step` (bf16 autocast on GPU: the
             platform's `autocast`) on a synthetic paired batch already on the device: ecg (B, 12, T) under
             the encoder's input contract, angio_feats (B, V, P, F) as cached frame features (what the model
             consumes; the frame encoder is not in the training step), view_mask, angles, targets. Also
             timed: the host-to-device copy of that batch from ordinary (unpinned) CPU memory, as the loop's
             `to_device` does it, which the synthetic on-device batch leaves out of samples/s.
  features   the platform's `FrameEncoderActor` (stence/train/features.py, unmodified) inside a Ray actor with
             num_gpus=1, over the key frames of the same synthetic cohort and the (view, variant) pairs
             extraction enumerates (augmentation of variants > 0 included): frames/s of its __call__ at
             feature.batch_size (host-side stacking, augmentation, copies and the D2H of features included);
             and the frame encoder's bf16 forward alone on a device-resident batch at 1x and 4x that batch
             size, with its TFLOP/s and MFU. The Ray Data pipeline around the actor (map_batches,
             ActorPoolStrategy) is not part of the timing.

FLOPs: torch.utils.flop_counter.FlopCounterMode over one real step (`pretrain_step`; one forward for the frame
encoder), with scaled_dot_product_attention forced to its math backend while counting, so attention is counted
as its matmuls on every device (the CPU flash kernel is invisible to the counter, and the CUDA flash
backward's recomputation would add work that is not model FLOPs). Counted: matmuls, convolutions, attention;
not counted: element-wise work (norms, activations, softmax, the optimiser). Achieved TFLOP/s = FLOPs/sample x
samples/s / 1e12; MFU = achieved / the GPU's bf16 dense peak (PEAKS, by device name; --peak-tflops overrides).

Feeding: cores needed = pretraining samples/s / data-path samples/s per core.

Note on the driver: `stence.train.driver.build_trainer` builds TorchTrainer without a `torch_config`
(driver.py:197-202), so the backend cannot be named there; Ray's TorchTrainer then picks "nccl" when use_gpu
is set (ray/train/v2/torch/torch_trainer.py:192-200) and use_gpu is train.gpus > 0 (driver.py:176-177). The
check relies on that and reads the backend back in the worker. With one worker `wrap_model` does not DDP-wrap
(common.py:75) and the `all_reduce_*` helpers are no-ops (worker.py:61 `_distributed`), so the loop runs one
explicit all_reduce to prove that the NCCL process group works.

--cpu-smoke: the same code path on CPU (gloo, the platform's autocast is off on CPU so float32, OTIS-tiny,
64-px frame features, a few steps, no peak: MFU "n/a"), for tests on machines without a GPU: about a minute on an
idle 2-core machine, nearly all of it the start of Ray and of the Train worker group.
Without a visible GPU and without --cpu-smoke the check refuses (exit code 2, one line).

Usage: python -m bench.gpu_check [--minutes 6] [--encoder otis_base] [--batch 128] [--views 4]
                                 [--parts data,pretrain,features] [--cohort DIR] [--config YAML]
                                 [--loader-workers N] [--peak-tflops X] [--cpu-smoke]
                                 [--out bench/results/gpu_check.json]
Exit code: 0 every part ran, 1 a part failed (the others are still reported), 2 no GPU visible.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import torch

from bench.gpu_math import cores_needed, peak_bf16_tflops, throughput_figures
from bench.gpu_parts import (
    PAPER_CONFIG,
    check_config,
    frame_patches,
    make_cohort,
    run_data_path,
    run_features,
    run_pretrain,
    write_feature_store,
)

PARTS = ("data", "pretrain", "features")

# share of --minutes given to each part's timed window (the rest is start-up: ingest, Ray, worker group, models)
WINDOW_SHARE = {"data": 0.10, "pretrain": 0.25, "features": 0.10}


# ---------------------------------------------------------------------------------------------------
# device, report


def device_info(gpu: bool) -> dict[str, Any]:
    info: dict[str, Any] = {
        "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
        "host": platform.node(), "cpu_cores": os.cpu_count(),
    }
    try:
        import ray

        info["ray"] = ray.__version__
    except ImportError:
        info["ray"] = None
    if gpu:
        props = torch.cuda.get_device_properties(0)
        info.update({
            "name": torch.cuda.get_device_name(0),
            "capability": "sm_{}{}".format(*torch.cuda.get_device_capability(0)),
            "memory_gib": round(props.total_memory / 2**30, 1),
            "multiprocessors": props.multi_processor_count,
            "gpus_visible": torch.cuda.device_count(),
            "cudnn": torch.backends.cudnn.version(),
            "nccl": ".".join(map(str, torch.cuda.nccl.version())) if hasattr(torch.cuda, "nccl") else None,
        })
    else:
        info.update({"name": "cpu", "capability": None})
    return info


def refusal(args: argparse.Namespace) -> str | None:
    """The one-line refusal when no GPU is visible and --cpu-smoke is not given; None otherwise."""
    if args.cpu_smoke or torch.cuda.is_available():
        return None
    build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
    return (f"gpu_check: no CUDA GPU visible (torch {torch.__version__}, {build}, "
            f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')}); "
            "run it on a GPU machine with the CUDA torch wheel, or pass --cpu-smoke")


def _fmt(v: float | None, spec: str = ".1f", suffix: str = "") -> str:
    return "n/a" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:{spec}}{suffix}"


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * v:.1f} %"


def format_table(r: dict[str, Any]) -> str:
    """The compact table printed at the end."""
    d = r["device"]
    peak = r["peak"]
    lines = [f"device     {d['name']} ({d.get('capability')}), torch {d['torch']}, CUDA {d['cuda']}, "
             f"NCCL {d.get('nccl')}, ray {d.get('ray')}; bf16 peak "
             f"{_fmt(peak['tflops'], '.0f', ' TFLOP/s')} ({peak['source']})"]
    rows: list[tuple[str, str, str]] = []
    p = r.get("pretrain")
    if isinstance(p, dict) and "samples_per_s" in p:
        rows += [
            ("pretrain", f"samples/s ({r['setup']['encoder']}, batch {p['batch']}, {p['precision']}, "
                         f"{p['backend']} x{p['world_size']})", _fmt(p["samples_per_s"])),
            ("", "model GFLOP/sample (FlopCounterMode)", _fmt(p["flops_per_sample"] / 1e9, ".3g")),
            ("", "achieved TFLOP/s", _fmt(p["achieved_tflops"], ".2f")),
            ("", "MFU", _pct(p["mfu"])),
        ]
        if p.get("h2d_samples_per_s_ceiling") is not None:  # GPU only
            rows += [
                ("", f"H2D copy of a loader batch (unpinned), samples/s cap ({_fmt(p['h2d_gb_per_s'])} GB/s)",
                 _fmt(p["h2d_samples_per_s_ceiling"])),
                ("", "peak GPU memory GiB", _fmt(p["peak_mem_gib"])),
            ]
        rows.append(("", "parameters, millions", _fmt(p["params"] / 1e6)))
    elif p is not None:
        rows.append(("pretrain", "FAILED", str(p.get("error", ""))[:80]))
    f = r.get("features")
    if isinstance(f, dict) and "actor_path" in f:
        a = f["actor_path"]
        rows.append(("features", f"FrameEncoderActor frames/s ({f['frame_encoder']} {f['image_size']} px, "
                                 f"batch {a['batch']}, {100 * a['augmented_share']:.0f} % augmented)",
                     _fmt(a["frames_per_s"])))
        for e in f["encoder_only"]:
            rows.append(("", f"encoder forward frames/s, batch {e['batch']} "
                             f"({_fmt(e['flops_per_frame'] / 1e9, '.3g')} GFLOP/frame)", _fmt(e["frames_per_s"])))
            rows.append(("", f"  achieved TFLOP/s / MFU, batch {e['batch']}",
                         f"{_fmt(e['achieved_tflops'], '.2f')} / {_pct(e['mfu'])}"))
    elif f is not None:
        rows.append(("features", "FAILED", str(f.get("error", ""))[:80]))
    dp = r.get("data")
    if isinstance(dp, dict) and "samples_per_s_per_core" in dp:
        rows.append(("data", f"samples/s per core (loader workers {dp['loader_workers']}, batch {dp['batch']}, "
                             f"{_fmt(dp['angio_feats_mb_per_sample'], '.3g')} MB features/sample)",
                     _fmt(dp["samples_per_s_per_core"])))
    elif dp is not None:
        rows.append(("data", "FAILED", str(dp.get("error", ""))[:80]))
    feed = r.get("feed", {})
    if feed.get("cores_needed") is not None:
        rows.append(("feed", f"CPU cores to feed the GPU's samples/s (this machine: {feed['cores_available']})",
                     _fmt(feed["cores_needed"])))
    width = max([len(b) for _, b, _ in rows] + [10])
    lines += [f"{a:10s} {b:{width}s} {c:>12s}" for a, b, c in rows]
    return "\n".join(lines)


def _write(path: Path, result: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(result, indent=2, default=str))
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------------
# main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=None,
                   help="time budget that sizes the timed windows (default 6; 0.1 with --cpu-smoke)")
    p.add_argument("--encoder", default=None, help="ECG encoder registry name (default otis_base; otis_tiny "
                   "with --cpu-smoke)")
    p.add_argument("--batch", type=int, default=None, help="pretraining batch on the one worker (default 128; 8 "
                   "with --cpu-smoke)")
    p.add_argument("--views", type=int, default=None, help="angiography views per study (default 4; 2 smoke)")
    p.add_argument("--config", default=None, help="YAML config (default configs/paper.yaml; built-in defaults "
                   "with --cpu-smoke)")
    p.add_argument("--cohort", default=None, help="an ingested cohort to use instead of a synthetic one made "
                   "here (only read; its key frames feed the feature part, its ECGs the data part)")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    p.add_argument("--loader-workers", type=int, default=None,
                   help="DataLoader workers of the data part (default min(4, cores); 1 with --cpu-smoke)")
    p.add_argument("--data-batch", type=int, default=16, help="loader batch of the data part (per-core rate "
                   "barely depends on it; a large one only fills shared memory)")
    p.add_argument("--peak-tflops", type=float, default=None, help="bf16 dense peak to use instead of the table")
    p.add_argument("--cpu-smoke", action="store_true", help="the same path on CPU, tiny models, a few steps")
    p.add_argument("--out", default="bench/results/gpu_check.json")
    args = p.parse_args(argv)
    smoke = args.cpu_smoke
    args.minutes = args.minutes if args.minutes is not None else (0.1 if smoke else 6.0)
    args.encoder = args.encoder or ("otis_tiny" if smoke else "otis_base")
    args.batch = args.batch or (8 if smoke else 128)
    args.views = args.views or (2 if smoke else 4)
    if args.loader_workers is None:
        args.loader_workers = 1 if smoke else min(4, os.cpu_count() or 1)
    args.parts = [s.strip() for s in args.parts.split(",") if s.strip()]
    unknown = sorted(set(args.parts) - set(PARTS))
    if unknown:
        p.error(f"--parts: unknown {unknown}; valid: {list(PARTS)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    why = refusal(args)
    if why:
        print(why, file=sys.stderr)
        return 2
    t_start = time.perf_counter()
    os.environ.setdefault("STENCE_SALT", "gpu-check-secret")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    gpu = not args.cpu_smoke
    out = Path(args.out)
    smoke = args.cpu_smoke
    warmup, min_steps = (1, 2) if smoke else (10, 20)
    window = {k: v * args.minutes * 60 for k, v in WINDOW_SHARE.items()}
    dev = device_info(gpu)
    peak, source = (None, "cpu smoke: no peak") if smoke else peak_bf16_tflops(dev["name"])
    if args.peak_tflops:
        peak, source = args.peak_tflops, "--peak-tflops"
    result: dict[str, Any] = {
        "check": "gpu_check", "mode": "cpu-smoke" if smoke else "gpu", "command": [sys.executable, "-m",
                                                                                   "bench.gpu_check", *sys.argv[1:]],
        "argv": argv if argv is not None else sys.argv[1:], "device": dev,
        "peak": {"tflops": peak, "source": source}, "timings": {}, "windows_s": window,
    }
    print(f"gpu_check: {dev['name']} ({dev.get('capability')}), torch {dev['torch']}, CUDA {dev['cuda']}, "
          f"bf16 peak {_fmt(peak, '.0f', ' TFLOP/s')} ({source}); parts {args.parts}", flush=True)
    failed = False
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        cfg = check_config(args, str(Path(tmp) / "ray"))
        patches = frame_patches(cfg)
        result["setup"] = {"encoder": args.encoder, "batch": args.batch, "views": args.views, "patches": patches,
                           "feature_dim": cfg.feature.feature_dim, "frame_encoder": cfg.feature.frame_encoder,
                           "image_size": cfg.feature.image_size, "frame_size": cfg.data.frame_size,
                           "variants": cfg.feature.variants, "angio_dim": cfg.model.angio_dim,
                           "config": str(args.config or ("defaults" if smoke else PAPER_CONFIG))}
        cohort = Path(args.cohort).resolve() if args.cohort else None
        if cohort is None and ("data" in args.parts or "features" in args.parts):
            t = time.perf_counter()
            # smoke: decode in this process (a spawned pool costs more than the few files)
            cohort = make_cohort(cfg, Path(tmp), patients=8 if smoke else 24, views=args.views,
                                 processes=1 if smoke else max(1, min(4, os.cpu_count() or 1)))
            result["timings"]["cohort_s"] = time.perf_counter() - t
        result["setup"]["cohort"] = str(args.cohort or "synthetic")
        if "data" in args.parts:
            print("data path ...", flush=True)
            try:
                t = time.perf_counter()
                store = write_feature_store(cohort, Path(tmp) / "features", cfg.feature.variants, patches,
                                            cfg.feature.feature_dim)
                result["data"] = run_data_path(cfg, cohort, store, workers=args.loader_workers,
                                               batch=args.data_batch, seconds=window["data"],
                                               warmup_batches=2 * max(1, args.loader_workers) + 1,
                                               min_batches=2)
                result["timings"]["data_s"] = time.perf_counter() - t
            except Exception as e:  # noqa: BLE001 - report it, run the other parts
                failed = True
                result["data"] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
            _write(out, result)
        if "pretrain" in args.parts or "features" in args.parts:
            from stence.train.driver import ensure_ray

            t = time.perf_counter()
            ensure_ray()
            result["timings"]["ray_start_s"] = time.perf_counter() - t
        if "pretrain" in args.parts:
            print("pretraining ...", flush=True)
            try:
                p = run_pretrain(cfg, views=args.views, patches=patches, seconds=window["pretrain"],
                                 warmup_steps=warmup, min_steps=min_steps)
                p.update(throughput_figures(p["flops_per_sample"], p["samples_per_s"], peak))
                if not p["loss_finite"]:
                    raise RuntimeError(f"the training loss is not finite ({p['loss']})")
                result["pretrain"] = p
                result["timings"]["pretrain_s"] = p["fit_wall_s"]
            except Exception as e:  # noqa: BLE001
                failed = True
                result["pretrain"] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
            _write(out, result)
        if "features" in args.parts:
            print("feature extraction ...", flush=True)
            try:
                t = time.perf_counter()
                result["features"] = run_features(cfg, str(cohort), gpu=gpu, seconds=window["features"],
                                                  warmup=warmup, min_batches=min_steps, peak=peak)
                result["timings"]["features_s"] = time.perf_counter() - t
            except Exception as e:  # noqa: BLE001
                failed = True
                result["features"] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
    gpu_sps = result.get("pretrain", {}).get("samples_per_s")
    per_core = result.get("data", {}).get("samples_per_s_per_core")
    result["feed"] = {"cores_needed": cores_needed(gpu_sps, per_core), "cores_available": os.cpu_count()}
    result["timings"]["total_s"] = time.perf_counter() - t_start
    _write(out, result)
    print(format_table(result))
    for part in PARTS:
        err = result.get(part, {}).get("error") if isinstance(result.get(part), dict) else None
        if err:
            print(f"{part} FAILED: {err}", file=sys.stderr)
    print(f"total {result['timings']['total_s']:.0f} s; wrote {out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
