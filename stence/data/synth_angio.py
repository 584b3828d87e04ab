"""Synthetic X-ray angiography cine: a 3-D coronary tree projected by the C-arm angulation.

The tree has the 16 AHA/SYNTAX segments (RCA 1-4; LCA 5-16: left main 5, LAD 6-8, diagonals 9-10, LCX 11
and 13, obtuse marginal 12, posterolateral 14, 15, and 16 as a ramus intermedius, ours), each a smooth
3-D curve jittered per patient. A view rotates the tree by its primary (LAO +, RAO -) and secondary
(cranial +, caudal -) angles and projects it orthographically. Vessels are dark, contrast-filled tubes
on a bright, noisy background; contrast flows in from the ostia over the frames.

A stenosis of degree d narrows its segment over a visible length to (1 - d/100) of the lumen; at >= 90 %
the vessel beyond fills late, and 100 % cuts it off (the rest of the segment and all its descendants
stay unfilled).

So that a stenosis is as visible as the method's "angiography carries the signal strongly" requires, the
projection is that of a tube, not of a chain of discs: each pixel takes the lumen of its nearest centreline
sample in each vessel (a chain of discs lets the wide lumen on either side of a short lesion cover it up),
and a thin lumen holds proportionally less contrast (the X-ray path through the iodine shrinks with the
diameter), so a tight lesion shows as a pale, thin waist about two vessel diameters long.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

# segment -> parent (None: starts at an ostium); every parent has a smaller number than its children
SEGMENT_PARENT: dict[int, int | None] = {
    1: None, 2: 1, 3: 2, 4: 3,
    5: None, 6: 5, 7: 6, 8: 7, 9: 6, 10: 7, 11: 5, 12: 11, 13: 11, 14: 13, 15: 13, 16: 5,
}  # fmt: skip
OSTIA = {"rca": (-0.1, -0.55, 0.25), "lca": (0.1, -0.6, 0.15)}
# mid and end control points, x = patient's left, y = inferior, z = anterior, heart radius about 1
_TEMPLATE: dict[int, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    1: ((-0.45, -0.45, 0.35), (-0.7, -0.2, 0.3)),
    2: ((-0.82, 0.1, 0.15), (-0.75, 0.4, -0.05)),
    3: ((-0.55, 0.65, -0.3), (-0.2, 0.8, -0.45)),
    4: ((0.1, 0.9, -0.35), (0.4, 0.95, -0.1)),
    5: ((0.18, -0.62, 0.18), (0.27, -0.6, 0.2)),
    6: ((0.35, -0.45, 0.45), (0.35, -0.2, 0.6)),
    7: ((0.4, 0.1, 0.65), (0.5, 0.4, 0.6)),
    8: ((0.6, 0.7, 0.45), (0.65, 0.95, 0.25)),
    9: ((0.6, -0.05, 0.55), (0.8, 0.2, 0.4)),
    10: ((0.75, 0.55, 0.45), (0.9, 0.75, 0.25)),
    11: ((0.45, -0.6, 0.0), (0.6, -0.5, -0.2)),
    12: ((0.85, -0.25, -0.15), (0.95, 0.1, -0.1)),
    13: ((0.65, -0.3, -0.45), (0.55, -0.05, -0.65)),
    14: ((0.75, 0.3, -0.55), (0.8, 0.6, -0.4)),
    15: ((0.4, 0.25, -0.75), (0.25, 0.5, -0.8)),
    16: ((0.55, -0.35, 0.25), (0.75, -0.05, 0.15)),
}
# lumen radius in pixels at 64 px (scaled with the image size)
SEGMENT_RADIUS: dict[int, float] = {
    1: 2.4, 2: 2.2, 3: 2.0, 4: 1.5, 5: 2.6, 6: 2.3, 7: 2.0, 8: 1.5,
    9: 1.6, 10: 1.4, 11: 2.1, 12: 1.6, 13: 1.8, 14: 1.4, 15: 1.4, 16: 1.5,
}  # fmt: skip
# standard angulations (primary, secondary) in degrees: LAO/RAO and cranial/caudal
STANDARD_VIEWS: tuple[tuple[float, float], ...] = (
    (45.0, 0.0), (-30.0, -25.0), (40.0, 25.0), (-30.0, 30.0),
    (50.0, -30.0), (0.0, 40.0), (0.0, -30.0), (90.0, 0.0),
)  # fmt: skip
LESION_HALF_LENGTH = 0.35  # lesion half-length as a fraction of its segment (narrowed over about 60 %)
THIN_LUMEN_RADIUS = 1.4  # below about this radius (pixels at 64 px) darkness is proportional to the lumen
_SAMPLES_PER_SEGMENT = 40
_CATHETER = ((0.05, -1.1, 0.15), (-0.05, -2.2, 0.1))


@dataclass(frozen=True)
class CoronaryTree:
    """One patient's 3-D tree: a (K, 3) polyline per segment and where on each a lesion would sit."""

    points: dict[int, np.ndarray]
    lesion_pos: dict[int, float]  # fraction along the segment of a lesion's centre


@dataclass(frozen=True)
class View:
    """C-arm angulation in degrees: primary LAO (+) / RAO (-), secondary cranial (+) / caudal (-)."""

    primary: float
    secondary: float


def _bezier(p0: np.ndarray, mid: np.ndarray, p2: np.ndarray, k: int) -> np.ndarray:
    """Quadratic curve through p0, mid (at t = 0.5) and p2: (k, 3)."""
    ctrl = 2.0 * mid - 0.5 * (p0 + p2)
    t = np.linspace(0.0, 1.0, k)[:, None]
    return (1 - t) ** 2 * p0 + 2 * (1 - t) * t * ctrl + t**2 * p2


def sample_tree(rng: np.random.Generator, jitter: float = 0.05) -> CoronaryTree:
    """Draw a patient's coronary tree: template control points plus Gaussian jitter."""
    pts: dict[int, np.ndarray] = {}
    for seg, parent in SEGMENT_PARENT.items():
        start = np.asarray(OSTIA["rca" if seg <= 4 else "lca"]) if parent is None else pts[parent][-1]
        mid, end = (np.asarray(p) + rng.normal(0.0, jitter, 3) for p in _TEMPLATE[seg])
        pts[seg] = _bezier(start, mid, end, _SAMPLES_PER_SEGMENT)
    lesion_pos = {seg: float(rng.uniform(0.3, 0.7)) for seg in SEGMENT_PARENT}
    return CoronaryTree(points=pts, lesion_pos=lesion_pos)


def standard_views(n: int, rng: np.random.Generator, jitter_deg: float = 4.0) -> list[View]:
    """n distinct angulations from the standard set (cycled beyond 8), each jittered by a few degrees."""
    out = []
    for k in range(n):
        a, b = STANDARD_VIEWS[k % len(STANDARD_VIEWS)]
        extra = 10.0 * (k // len(STANDARD_VIEWS))
        out.append(
            View(
                primary=round(float(a + extra + rng.uniform(-jitter_deg, jitter_deg)), 1),
                secondary=round(float(b + rng.uniform(-jitter_deg, jitter_deg)), 1),
            )
        )
    return out


def _rotation(view: View) -> np.ndarray:
    """(3, 3) rotation: primary about the head-foot axis, then secondary about the left-right axis."""
    a, b = np.deg2rad(view.primary), np.deg2rad(view.secondary)
    ry = np.array([[np.cos(a), 0.0, -np.sin(a)], [0.0, 1.0, 0.0], [np.sin(a), 0.0, np.cos(a)]])
    rx = np.array([[1.0, 0.0, 0.0], [0.0, np.cos(b), -np.sin(b)], [0.0, np.sin(b), np.cos(b)]])
    return rx @ ry


@dataclass(frozen=True)
class _Samples:
    xy: np.ndarray  # (S, 2) pixel coordinates (x = column, y = row)
    radius: np.ndarray  # (S,) lumen radius, pixels
    opacity: np.ndarray  # (S,) darkness at full contrast in [0, 1]
    arrival: np.ndarray  # (S,) contrast arrival (path length from the ostium, inf = never)
    length: float  # longest unobstructed path (sets the filling speed)
    tube: np.ndarray  # (S,) vessel each sample belongs to: segment id, 0 = catheter


def _samples(tree: CoronaryTree, lesions: Mapping[int, float], view: View, size: int) -> _Samples:
    """Project the tree and compute per-sample radius and contrast arrival, lesions applied."""
    rot = _rotation(view)
    scale, px = 0.36 * size, size / 64.0
    end_arrival: dict[int, float] = {}
    end_delay: dict[int, float] = {}
    xy, rad, arr, tube = [], [], [], []
    # unobstructed length first: it sets the delay unit
    seg_len = {
        s: np.r_[0.0, np.cumsum(np.linalg.norm(np.diff(p, axis=0), axis=1))] for s, p in tree.points.items()
    }
    base_end: dict[int, float] = {}
    for seg, parent in SEGMENT_PARENT.items():
        base_end[seg] = (0.0 if parent is None else base_end[parent]) + seg_len[seg][-1]
    total = max(base_end.values())
    for seg, parent in SEGMENT_PARENT.items():
        p3 = tree.points[seg]
        s = seg_len[seg]
        u = s / s[-1]
        a0 = 0.0 if parent is None else end_arrival[parent]
        delay = 0.0 if parent is None else end_delay[parent]
        r = SEGMENT_RADIUS[seg] * (1.0 - 0.15 * u)
        arrival = a0 + s + delay
        deg = float(lesions.get(seg, 0.0))
        if deg > 0:
            bump = np.exp(-((np.abs(u - tree.lesion_pos[seg]) / LESION_HALF_LENGTH) ** 4))
            r = r * (1.0 - deg / 100.0 * bump)
            distal = u > tree.lesion_pos[seg]
            if deg >= 100:
                arrival = np.where(distal, np.inf, arrival)
            elif deg >= 90:
                extra = total * 0.45 * (deg - 85.0) / 15.0  # late filling (TIMI 2 flow)
                arrival = np.where(distal, arrival + extra, arrival)
        end_arrival[seg] = float(arrival[-1])
        end_delay[seg] = float(arrival[-1] - (a0 + s[-1])) if np.isfinite(arrival[-1]) else np.inf
        seg_xy, r, arrival = _densify((p3 @ rot.T)[:, :2] * scale + size / 2.0, r, arrival, max_step=0.5)
        xy.append(seg_xy)
        rad.append(r)
        arr.append(arrival)
        tube.append(np.full(len(seg_xy), seg))
    cath = _bezier(np.asarray(OSTIA["lca"]), np.asarray(_CATHETER[0]), np.asarray(_CATHETER[1]), 40)
    cath_xy = _densify((cath @ rot.T)[:, :2] * scale + size / 2.0, max_step=0.5)[0]
    xy.append(cath_xy)
    rad.append(np.full(len(cath_xy), 0.8))
    arr.append(np.zeros(len(cath_xy)))
    tube.append(np.zeros(len(cath_xy), dtype=np.int64))
    radius = np.concatenate(rad)
    # opacity grows with the lumen (longer X-ray path through contrast); a thin lumen, as in a stenosis,
    # holds proportionally little contrast (the line through the origin), a wide one saturates
    opacity = np.clip(np.minimum(0.45 + 0.25 * radius, radius / THIN_LUMEN_RADIUS), 0.0, 1.0)
    return _Samples(
        xy=np.concatenate(xy),
        radius=radius * px,
        opacity=opacity,
        arrival=np.concatenate(arr),
        length=float(total),
        tube=np.concatenate(tube),
    )


def _densify(xy: np.ndarray, *values: np.ndarray, max_step: float = 0.5) -> list[np.ndarray]:
    """Resample one polyline so neighbours are at most `max_step` pixels apart (large images)."""
    step = float(np.linalg.norm(np.diff(xy, axis=0), axis=1).max(initial=0.0))
    k = int(np.ceil(step / max_step))
    if k <= 1:
        return [xy, *values]
    n = len(xy)
    src = np.linspace(0.0, n - 1.0, (n - 1) * k + 1)
    base = np.arange(n, dtype=np.float64)
    out = [np.stack([np.interp(src, base, xy[:, j]) for j in range(2)], axis=1)]
    for v in values:
        finite = np.isfinite(v)
        w = np.interp(src, base, np.where(finite, v, 0.0))
        ok = np.interp(src, base, finite.astype(np.float64)) > 0.999
        out.append(np.where(ok, w, np.inf))
    return out


def vessel_layers(
    tree: CoronaryTree, lesions: Mapping[int, float], view: View, size: int
) -> tuple[np.ndarray, np.ndarray, float]:
    """Rasterise the projected tree: (opacity (H, W) in [0, 1], contrast arrival (H, W), tree length).

    Opacity is for a fully filled vessel; pixels reached only by never-filled samples get opacity 0.
    """
    s = _samples(tree, lesions, view, size)
    filled = np.isfinite(s.arrival)
    pts, rad, opa, arr, tube = s.xy[filled], s.radius[filled], s.opacity[filled], s.arrival[filled], s.tube[filled]
    opacity = np.zeros(size * size)
    arrival = np.full(size * size, np.inf)
    # candidate (sample, pixel) pairs: every pixel of a small window around each sample
    half = int(np.ceil(rad.max(initial=0.0) + 1.0))
    oy, ox = (o.ravel() for o in np.mgrid[-half : half + 1, -half : half + 1])  # (O,)
    col = np.floor(pts[:, 0]).astype(np.int64)[:, None] + ox[None, :]  # (S, O)
    row = np.floor(pts[:, 1]).astype(np.int64)[:, None] + oy[None, :]  # (S, O)
    dist = np.hypot(col + 0.5 - pts[:, :1], row + 0.5 - pts[:, 1:])  # (S, O)
    inside = (col >= 0) & (col < size) & (row >= 0) & (row < size)
    flat = (row * size + col)[inside]  # (C,) candidate pixel
    idx = np.broadcast_to(np.arange(len(pts))[:, None], dist.shape)[inside]  # (C,) candidate sample
    d = dist[inside]
    # tube projection: per (vessel, pixel) keep only the nearest centreline sample, whose lumen decides
    key = tube[idx] * (size * size) + flat
    order = np.lexsort((d, key))
    first = order[np.r_[True, key[order][1:] != key[order][:-1]]]
    flat, idx, d = flat[first], idx[first], d[first]
    cov = np.clip(rad[idx] - d + 0.5, 0.0, 1.0)  # anti-aliased coverage of that lumen
    ok = cov > 0
    np.maximum.at(opacity, flat[ok], (cov * opa[idx])[ok])  # overlapping vessels: the darker one
    np.minimum.at(arrival, flat[ok], arr[idx][ok])
    return opacity.reshape(size, size), arrival.reshape(size, size), s.length


def _background(size: int, rng: np.random.Generator) -> np.ndarray:
    """Bright, smoothly varying background (soft tissue, diaphragm) before noise: (H, W) float."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    bg = np.full((size, size), rng.uniform(150.0, 185.0))
    for _ in range(4):
        cy, cx, sd = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.15, 0.4)
        bg += rng.normal(0.0, 18.0) * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * sd**2))
    angle = rng.uniform(0, 2 * np.pi)
    edge = (xx - 0.5) * np.cos(angle) + (yy - 0.5) * np.sin(angle) - rng.uniform(0.2, 0.45)
    bg += 25.0 / (1.0 + np.exp(-edge / 0.03))  # diaphragm / lung border
    return bg


def fill_fraction(arrival: np.ndarray, length: float, frame: int, frames: int) -> np.ndarray:
    """Contrast present at each pixel in `frame`: the front passes the whole tree by about 2/3 of the run."""
    front = length * 1.5 * (frame + 1) / max(frames, 1)
    return np.clip((front - arrival) / (0.08 * length) + 0.5, 0.0, 1.0)


def render_view(
    tree: CoronaryTree,
    lesions: Mapping[int, float],
    view: View,
    *,
    frames: int,
    size: int,
    rng: np.random.Generator,
    noise: float = 1.0,
) -> np.ndarray:
    """Render one cine run: (frames, size, size) uint8, dark vessels on a bright background."""
    opacity, arrival, length = vessel_layers(tree, lesions, view, size)
    bg = _background(size, rng)
    contrast = rng.uniform(100.0, 130.0)
    phase = rng.uniform(0, 2 * np.pi)
    amp = 0.6 * size / 64.0
    out = np.empty((frames, size, size), np.uint8)
    for f in range(frames):
        layer = opacity * fill_fraction(arrival, length, f, frames)  # (H, W)
        ang = 2 * np.pi * f / max(frames, 1) + phase  # cardiac motion: a small periodic shift
        layer = ndimage.shift(layer, (amp * np.sin(ang), 0.5 * amp * np.cos(ang)), order=1, mode="constant")
        img = bg - contrast * layer
        if noise > 0:
            img = img + rng.normal(0.0, 6.0 * noise, img.shape)
        out[f] = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    return out


__all__ = [
    "CoronaryTree",
    "LESION_HALF_LENGTH",
    "SEGMENT_PARENT",
    "SEGMENT_RADIUS",
    "STANDARD_VIEWS",
    "View",
    "fill_fraction",
    "render_view",
    "sample_tree",
    "standard_views",
    "vessel_layers",
]
