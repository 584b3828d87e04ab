"""Geometric augmentation of angiography key frames for training a frame encoder end to end (stage A).

Patients' trees differ in size, position and orientation on the detector and the C-arm angles scatter
around the standard views, so a small random rotation, scale and shift of each view is label-preserving;
with the few hundred key frames of a small cohort it is what lets a conv encoder generalise.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def random_affine(
    frame: np.ndarray,
    rng: np.random.Generator,
    max_deg: float = 20.0,
    max_scale: float = 0.1,
    max_shift: float = 0.04,
) -> np.ndarray:
    """(H, W) frame -> the same frame rotated by U(-max_deg, max_deg) degrees about its centre, scaled by
    U(1 - max_scale, 1 + max_scale) and shifted by U(-max_shift, max_shift) of its size; edges are extended.
    """
    h, w = frame.shape
    a = np.deg2rad(rng.uniform(-max_deg, max_deg))
    s = rng.uniform(1.0 - max_scale, 1.0 + max_scale)
    shift = rng.uniform(-max_shift, max_shift, size=2) * np.array([h, w])
    # affine_transform maps output coordinates to input ones: inverse rotation and scale about the centre
    inv = np.array([[np.cos(a), np.sin(a)], [-np.sin(a), np.cos(a)]]) / s
    centre = (np.array([h, w]) - 1) / 2.0
    offset = centre - inv @ (centre + shift)
    out = ndimage.affine_transform(np.asarray(frame, np.float32), inv, offset=offset, order=1, mode="nearest")
    return out.astype(np.float32, copy=False)


__all__ = ["random_affine"]


def augment_frames(frames: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(N, H, W) in [0, 1] -> augmented copy: gamma, contrast, noise and a small translation."""
    x = np.clip(frames, 0, 1) ** rng.uniform(0.8, 1.25)
    x = (x - x.mean()) * rng.uniform(0.85, 1.15) + x.mean()
    x = x + rng.normal(0, 0.02, size=x.shape)
    shift = rng.integers(-2, 3, size=2)
    x = np.roll(x, tuple(int(s) for s in shift), axis=(-2, -1))
    return np.clip(x, 0, 1).astype(np.float32)
