"""Training-time augmentations: the paper's ECG augmentations and angiography view dropout.

Every random draw comes from the `np.random.Generator` passed in, so a seed reproduces a batch exactly.
"""

from __future__ import annotations

import numpy as np

# The paper's ECG augmentations, applied in this order.
SHIFT_MAX_S = 1.0  # circular time shift U(-SHIFT_MAX_S, SHIFT_MAX_S) seconds, always applied
SCALE_RANGE = (0.6, 1.3)  # one amplitude factor for all leads
P_SCALE = 0.8
NOISE_STD = 0.03  # additive Gaussian noise (on the normalised signal)
P_NOISE = 0.3
MASK_SEGMENTS = 5  # segments zeroed across all leads
MASK_SEGMENT_S = 0.3
P_MASK = 0.5


def augment_ecg(
    x: np.ndarray,
    fs: float,
    rng: np.random.Generator,
    *,
    p_scale: float = P_SCALE,
    p_noise: float = P_NOISE,
    p_mask: float = P_MASK,
) -> np.ndarray:
    """Augment one crop, (12, W) -> (12, W) float32: shift, scale, noise, masking (in that order).

    The probabilities default to the paper's; tests force a step by passing 1.0 (or 0.0 to skip it).
    """
    x = np.asarray(x, dtype=np.float32)
    n_leads, w = x.shape
    shift = int(round(rng.uniform(-SHIFT_MAX_S, SHIFT_MAX_S) * fs))
    x = np.roll(x, shift, axis=1)  # circular: what leaves one end re-enters at the other
    if rng.random() < p_scale:
        x = x * np.float32(rng.uniform(*SCALE_RANGE))
    if rng.random() < p_noise:
        x = x + rng.normal(0.0, NOISE_STD, size=x.shape).astype(np.float32)
    if rng.random() < p_mask:
        seg = min(max(int(round(MASK_SEGMENT_S * fs)), 1), w)
        starts = rng.integers(0, w - seg + 1, size=MASK_SEGMENTS)
        x = x.copy()
        for s in starts:
            x[:, s : s + seg] = 0.0
    return x


def drop_views(n_views: int, max_fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Indices (ascending) of the views kept after dropping round(U(0, max_fraction) * n_views) views.

    At least one view is always kept.
    """
    if n_views < 1:
        raise ValueError(f"a study needs at least one view, got n_views={n_views}")
    frac = rng.uniform(0.0, max_fraction) if max_fraction > 0 else 0.0
    n_drop = min(int(round(frac * n_views)), n_views - 1)
    keep = rng.choice(n_views, size=n_views - n_drop, replace=False)
    return np.sort(keep).astype(np.int64)
