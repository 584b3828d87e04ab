"""The GPU check's arithmetic (bench/gpu_check.py): the bf16 peak table, FLOP counting, achieved TFLOP/s and
MFU, and the CPU cores it takes to feed the GPU."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from torch.utils.flop_counter import FlopCounterMode

# bf16 dense (no sparsity) tensor-core peaks from the vendor datasheets, TFLOP/s. First match wins: the
# specific names come before the general ones ("H100 PCIe" before "H100", "A100" can never match r"\bA10\b").
PEAKS: tuple[tuple[str, float, str], ...] = (
    (r"H100.*PCIE", 756.0, "H100 PCIe"),
    (r"H100.*NVL", 835.0, "H100 NVL"),
    (r"H200.*NVL", 835.0, "H200 NVL"),
    (r"GH200", 989.0, "GH200"),
    (r"H200", 989.0, "H200 SXM"),
    (r"H100", 989.0, "H100 SXM"),
    (r"A100", 312.0, "A100"),
    (r"\bL4\b", 121.0, "L4"),
    (r"\bA10\b", 125.0, "A10"),
)

# ---------------------------------------------------------------------------------------------------
# arithmetic: peak table, FLOP counting, throughput figures


def peak_bf16_tflops(device_name: str) -> tuple[float | None, str]:
    """(bf16 dense peak in TFLOP/s, matched label) for a torch.cuda.get_device_name(); (None, "unknown")."""
    for pattern, peak, label in PEAKS:
        if re.search(pattern, device_name, flags=re.IGNORECASE):
            return peak, label
    return None, "unknown"


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of one call of `fn` as FlopCounterMode counts them, attention through its math backend (model
    FLOPs: matmuls, convolutions, attention; element-wise work is not counted)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        fn()
    return int(counter.get_total_flops())


def throughput_figures(flops_per_sample: float, samples_per_s: float, peak_tflops: float | None) -> dict[str, Any]:
    """Achieved TFLOP/s (flops/sample x samples/s / 1e12) and MFU (achieved / peak; None without a peak)."""
    achieved = flops_per_sample * samples_per_s / 1e12
    mfu = achieved / peak_tflops if peak_tflops else None
    return {"achieved_tflops": achieved, "mfu": mfu}


def cores_needed(gpu_samples_per_s: float | None, per_core: float | None) -> float | None:
    """CPU cores of the data path it takes to feed the GPU's training rate."""
    if not gpu_samples_per_s or not per_core:
        return None
    return gpu_samples_per_s / per_core
