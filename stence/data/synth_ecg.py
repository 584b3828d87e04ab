"""Synthetic 12-lead ECG: a cardiac dipole model with a weak, territory-specific stenosis effect.

Each beat is a sum of Gaussian waves (P, septal Q, R, S, T) whose 3-D dipole directions are projected
onto the 12 lead vectors (x = patient's left, y = inferior, z = anterior). Heart-rate variability,
baseline wander, mains hum and white noise are added per record; axis, amplitudes, rate, electrode
gains and a per-lead ST offset vary per patient and are larger than the disease effect.

Stenosis adds ST-segment depression and T-wave flattening in the leads of its territory, growing with the
degree: RCA -> II, III, aVF; LAD (segments 6-10) -> V1-V4; LCX (segments 11-15, and 16, the ramus
intermedius, ours) -> I, aVL, V5, V6; the left main (5) feeds both LAD and LCX.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from stence.config import STANDARD_LEADS

TERRITORY_SEGMENTS: dict[str, tuple[int, ...]] = {
    "rca": (1, 2, 3, 4),
    "lad": (5, 6, 7, 8, 9, 10),
    "lcx": (5, 11, 12, 13, 14, 15, 16),
}
TERRITORY_LEADS: dict[str, tuple[str, ...]] = {
    "rca": ("II", "III", "aVF"),
    "lad": ("V1", "V2", "V3", "V4"),
    "lcx": ("I", "aVL", "V5", "V6"),
}
ST_DEPRESSION_MV = 0.08  # ST depression at 100 % stenosis and ecg_effect 1 (mV)
T_FLATTENING = 0.4  # fraction of the T wave removed at 100 % stenosis and ecg_effect 1


def _lead_vectors() -> np.ndarray:
    """(12, 3) lead vectors in STANDARD_LEADS order; limb leads obey Einthoven and Goldberger."""
    lead_i = np.array([1.0, 0.0, 0.0])
    lead_ii = np.array([0.5, np.sqrt(3) / 2, 0.0])
    lead_iii = lead_ii - lead_i
    avr, avl, avf = -(lead_i + lead_ii) / 2, lead_i - lead_ii / 2, lead_ii - lead_i / 2
    # Precordial leads lie in the transverse plane, angle from the patient's left towards anterior.
    angles = np.deg2rad([115.0, 95.0, 75.0, 55.0, 30.0, 0.0])
    precordial = [1.3 * np.array([np.cos(a), 0.15, np.sin(a)]) for a in angles]
    return np.stack([lead_i, lead_ii, lead_iii, avr, avl, avf, *precordial])


LEAD_VECTORS = _lead_vectors()


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


@dataclass(frozen=True)
class EcgPatient:
    """Patient-level physiology and nuisance parameters plus the territory severities (0-1)."""

    heart_rate: float  # bpm at rest
    axis_deg: float  # frontal QRS axis
    t_axis_deg: float  # frontal T axis
    p_amp: float  # mV
    r_amp: float  # mV
    s_amp: float  # mV
    t_amp: float  # mV
    qrs_width: float  # multiplies the Q/R/S widths
    pr_interval: float  # s, P peak to R peak
    lead_gain: tuple[float, ...]  # (12,) electrode placement / skin impedance
    st_offset: tuple[float, ...]  # (12,) mV, benign per-lead J-point variation
    severity: tuple[float, float, float]  # rca, lad, lcx in [0, 1]


def severity(degree: float) -> float:
    """Stenosis degree % -> effect size in [0, 1]: none below 40 %, linear to 1 at 100 %."""
    return float(np.clip((degree - 40.0) / 60.0, 0.0, 1.0))


def territory_degrees(segments: Mapping[int, float]) -> dict[str, float]:
    """Maximum degree per ECG territory (rca, lad, lcx); the left main counts for LAD and LCX."""
    return {
        t: max((float(segments.get(s, 0.0)) for s in segs), default=0.0)
        for t, segs in TERRITORY_SEGMENTS.items()
    }


def sample_patient(rng: np.random.Generator, segments: Mapping[int, float]) -> EcgPatient:
    """Draw one patient's ECG physiology; `segments` maps segment id -> stenosis degree %."""
    deg = territory_degrees(segments)
    axis = rng.normal(50.0, 20.0)
    return EcgPatient(
        heart_rate=float(rng.uniform(55.0, 90.0)),
        axis_deg=float(axis),
        t_axis_deg=float(axis + rng.normal(0.0, 12.0)),
        p_amp=float(rng.uniform(0.08, 0.2)),
        r_amp=float(rng.uniform(0.8, 1.8)),
        s_amp=float(rng.uniform(0.25, 0.6)),
        t_amp=float(rng.uniform(0.15, 0.55)),
        qrs_width=float(rng.uniform(0.85, 1.2)),
        pr_interval=float(rng.uniform(0.13, 0.19)),
        lead_gain=tuple(float(g) for g in rng.uniform(0.85, 1.15, 12)),
        st_offset=tuple(float(o) for o in rng.normal(0.0, 0.05, 12)),
        severity=(severity(deg["rca"]), severity(deg["lad"]), severity(deg["lcx"])),
    )


@dataclass(frozen=True)
class SimulatedEcg:
    """A simulated record: signal (12, T) in mV (STANDARD_LEADS order), its rate, and the R-peak times."""

    signal: np.ndarray
    fs: float
    r_peaks: np.ndarray  # (n_beats,) seconds, inside the record


def _beat_times(p: EcgPatient, duration_s: float, rng: np.random.Generator) -> np.ndarray:
    """R-peak times with respiratory sinus arrhythmia and beat-to-beat jitter (covers -1 s .. end + 1 s)."""
    hr = max(40.0, p.heart_rate + rng.normal(0.0, 4.0))
    rr0 = 60.0 / hr
    resp_f, resp_phase = rng.uniform(0.15, 0.35), rng.uniform(0, 2 * np.pi)
    t = -rng.uniform(0.0, rr0) - 1.0
    times = []
    while t < duration_s + 1.0:
        times.append(t)
        rr = rr0 * (1.0 + 0.04 * np.sin(2 * np.pi * resp_f * t + resp_phase) + rng.normal(0.0, 0.015))
        t += max(rr, 0.3)
    return np.asarray(times)


def _wave_train(t: np.ndarray, centers: np.ndarray, width: float | np.ndarray) -> np.ndarray:
    """Sum over beats of Gaussian bumps: (T,), (B,) -> (T,)."""
    w = np.broadcast_to(np.asarray(width, dtype=np.float64), centers.shape)
    out = np.zeros_like(t)
    for c, s in zip(centers, w, strict=True):
        lo, hi = np.searchsorted(t, (c - 6 * s, c + 6 * s))
        out[lo:hi] += np.exp(-0.5 * ((t[lo:hi] - c) / s) ** 2)
    return out


def _st_train(t: np.ndarray, r_peaks: np.ndarray, t_peaks: np.ndarray) -> np.ndarray:
    """Smooth plateau from the J point to the T peak of every beat: (T,) in [0, 1]."""
    out = np.zeros_like(t)
    for r, tp in zip(r_peaks, t_peaks, strict=True):
        lo, hi = np.searchsorted(t, (r, tp + 0.3))
        seg = t[lo:hi]
        rise = 1.0 / (1.0 + np.exp(-(seg - (r + 0.05)) / 0.008))
        fall = 1.0 / (1.0 + np.exp((seg - tp) / 0.04))
        out[lo:hi] += rise * fall
    return out


def simulate_ecg(
    p: EcgPatient,
    fs: float,
    duration_s: float,
    rng: np.random.Generator,
    *,
    ecg_effect: float = 1.0,
    noise: float = 1.0,
) -> SimulatedEcg:
    """Simulate one 12-lead record of `duration_s` seconds at `fs` Hz (noise 0 gives clean beats)."""
    n = int(round(duration_s * fs))
    t = np.arange(n) / fs
    r_peaks = _beat_times(p, duration_s, rng)
    rr = np.diff(r_peaks, append=r_peaks[-1] + (r_peaks[-1] - r_peaks[-2]))
    t_peaks = r_peaks + 0.27 * np.sqrt(np.clip(rr, 0.4, 1.6))  # Bazett-like QT scaling

    ax, tax = np.deg2rad(p.axis_deg), np.deg2rad(p.t_axis_deg)
    qw = p.qrs_width
    # (direction (3,), amplitude mV, centres (B,), width s) per wave
    waves = [
        (_unit(np.array([0.55, 0.8, 0.25])), p.p_amp, r_peaks - p.pr_interval, 0.022),
        (_unit(np.array([-0.6, 0.2, 0.75])), 0.15 * p.r_amp, r_peaks - 0.028 * qw, 0.009 * qw),
        (_unit(np.array([np.cos(ax), np.sin(ax), -0.35])), p.r_amp, r_peaks, 0.011 * qw),
        (_unit(np.array([-0.3, -0.6, -0.7])), p.s_amp, r_peaks + 0.03 * qw, 0.011 * qw),
    ]
    dipole = np.zeros((3, n))  # (3, T)
    for direction, amp, centres, width in waves:
        dipole += np.outer(direction * amp, _wave_train(t, centres, width))
    gain = np.asarray(p.lead_gain)[:, None]
    sig = gain * (LEAD_VECTORS @ dipole)  # (12, 3) @ (3, T) -> (12, T)

    t_dir = _unit(np.array([np.cos(tax), np.sin(tax), 0.35]))
    t_leads = gain * np.outer(LEAD_VECTORS @ t_dir * p.t_amp, _wave_train(t, t_peaks, 0.045))  # (12, T)
    st = _st_train(t, r_peaks, t_peaks)  # (T,)
    t_scale = np.ones((12, 1))
    st_level = np.asarray(p.st_offset, dtype=np.float64)[:, None] * np.ones((12, 1))
    for leads, sev in zip(TERRITORY_LEADS.values(), p.severity, strict=True):
        if sev > 0:
            idx = [STANDARD_LEADS.index(lead) for lead in leads]
            t_scale[idx] *= 1.0 - T_FLATTENING * ecg_effect * sev
            st_level[idx] -= ST_DEPRESSION_MV * ecg_effect * sev
    sig = sig + t_scale * t_leads + st_level * st[None, :]

    if noise > 0:
        sig = sig + noise * _noise(t, rng)
    inside = r_peaks[(r_peaks >= 0) & (r_peaks < duration_s)]
    return SimulatedEcg(signal=sig.astype(np.float64), fs=float(fs), r_peaks=inside)


def _noise(t: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Baseline wander, mains hum and white noise, (T,) -> (12, T) mV at noise level 1."""
    n = t.size
    f_wander = rng.uniform(0.05, 0.5, (12, 2, 1))
    phase = rng.uniform(0, 2 * np.pi, (12, 2, 1))
    amp = rng.uniform(0.03, 0.15, (12, 2, 1))
    wander = (amp * np.sin(2 * np.pi * f_wander * t[None, None, :] + phase)).sum(axis=1)  # (12, T)
    mains = 50.0 if rng.random() < 0.5 else 60.0
    hum = rng.uniform(0.005, 0.025, (12, 1)) * np.sin(2 * np.pi * mains * t + rng.uniform(0, 2 * np.pi))
    white = rng.normal(0.0, 0.012, (12, n))
    return wander + hum + white


def st_levels(ecg: SimulatedEcg) -> np.ndarray:
    """Mean ST level per lead (mV): signal at J + 60 ms (R + 100 ms) minus the PR baseline (R - 70 ms)."""
    fs, sig = ecg.fs, ecg.signal
    j = np.round((ecg.r_peaks + 0.10) * fs).astype(int)
    pr = np.round((ecg.r_peaks - 0.07) * fs).astype(int)
    ok = (pr >= 0) & (j < sig.shape[1])
    return (sig[:, j[ok]] - sig[:, pr[ok]]).mean(axis=1)


__all__ = [
    "EcgPatient",
    "LEAD_VECTORS",
    "SimulatedEcg",
    "TERRITORY_LEADS",
    "TERRITORY_SEGMENTS",
    "sample_patient",
    "severity",
    "simulate_ecg",
    "st_levels",
    "territory_degrees",
]
