"""The input contract of an ECG encoder: everything that turns a recorded ECG into the tensor it sees.

One frozen `InputContract` names the sampling rate, the window, the lead order, the filtering, the baseline
handling, the normalisation, the per-lead scaler and what happens at the record's edges. Every encoder
declares one (`ECGEncoder.contract`), every checkpoint, scorer and registered model stores it (inside
`input_spec`), and one module applies it (`stence.data.contract_apply`) in the training datasets, probing,
`stence predict` and `stence embed`.

Four kinds, chosen by `model.contract` (see `resolve_contract`):
- `paper`: what the StenCE code feeds both backbones: 500 Hz, 3 s windows, ALS baseline removal, +/- 4 sigma
  clip and group-wise z-score per window, no scaler.
- `project`: the same steps with the rate, window, baseline and clip settings of the `data.*` config (the
  contract of encoders trained from scratch on the platform).
- `otis`: OTIS upstream (`oetu/otis` `util/preprocess.py` + `TimeSeriesDataset`): no filter, no baseline; the
  whole stored record normalised with one robust mean/std over all leads x time (points beyond 3 sigma
  left out), clamped to +/- 3; then the first window.
- `echoingecg`: EchoingECG upstream (`kkianamm/EchoingECG` `downsample_ecg` + `scale_ecg`): zero-phase
  Butterworth band-pass 0.5-40 Hz at the recorded rate, polyphase resampling to 100 Hz with median padding,
  10 s window, per-lead scaler (the `ecg_scaler.pkl` shipped with the weights, converted to JSON).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from stence.config import STANDARD_LEADS

KINDS = ("paper", "project", "otis", "echoingecg")
BASELINES = ("als", "none")
NORMALISATIONS = ("window_group_z", "record_robust", "none")
RESAMPLE_PADDING = ("zero", "median")
MODEL_CONTRACT_CHOICES = ("auto", "native", "paper", "project")

# The paper's numbers (method.md): 500 Hz, 3 s, ALS lambda 1e7 / p 0.3 / 5 iterations, clip at 4 sigma.
PAPER_FS, PAPER_WINDOW_S = 500.0, 3.0
ALS_DEFAULTS = (1e7, 0.3, 5)
CLIP_SIGMA_DEFAULT = 4.0


@dataclass(frozen=True)
class InputContract:
    """How a recorded ECG (leads x time, mV, any rate) becomes the encoder's (len(leads), n_samples) input.

    Deterministic steps, in order, on the whole record (cached per contract, `deterministic_key`):
      1. `bandpass_hz`: zero-phase Butterworth band-pass of order 4 at the recorded rate (high cut limited to
         0.45 x `fs`), or None;
      2. polyphase resampling to `fs` (Kaiser 5 window), padding the record's edges with zeros or the median
         (`resample_padding`);
      3. `baseline` "als": per-lead asymmetric least squares baseline removed (`als_*`);
      4. `normalise` "record_robust": one mean/std over all leads x time of the whole record, leaving out
         points beyond `outlier_sigma` of the plain statistics, then clamped to +/- `clamp`.
    Per window (training draws a random start, evaluation and scoring take the first window):
      5. the window of `n_samples`; a shorter record is zero-padded on the right (`short_record`);
      6. `normalise` "window_group_z": NaN -> 0, clip at +/- `clip_sigma` x the window's std, z-score per
         lead group [I-III], [aVR-aVF], [V1-V6]; other normalisations only turn NaN into 0;
      7. the per-lead scaler, in float32: (x - scaler_mean) / max(scaler_scale, 1e-8), or none.
    """

    kind: str
    fs: float
    n_samples: int
    leads: tuple[str, ...] = STANDARD_LEADS
    bandpass_hz: tuple[float, float] | None = None
    resample_padding: str = "zero"
    baseline: str = "als"
    als_lambda: float = ALS_DEFAULTS[0]
    als_p: float = ALS_DEFAULTS[1]
    als_iter: int = ALS_DEFAULTS[2]
    normalise: str = "window_group_z"
    clip_sigma: float = CLIP_SIGMA_DEFAULT
    outlier_sigma: float = 3.0
    clamp: float = 3.0
    scaler_mean: tuple[float, ...] | None = None
    scaler_scale: tuple[float, ...] | None = None
    short_record: str = "zero_pad"
    source: str = ""  # where the contract comes from (upstream file and commit, or the paper)

    def __post_init__(self) -> None:
        for name in ("leads", "bandpass_hz", "scaler_mean", "scaler_scale"):  # lists from JSON / YAML
            v = getattr(self, name)
            if v is not None and not isinstance(v, tuple):
                object.__setattr__(self, name, tuple(v))
        object.__setattr__(self, "fs", float(self.fs))
        object.__setattr__(self, "n_samples", int(self.n_samples))
        problems = []
        if self.kind not in KINDS:
            problems.append(f"kind {self.kind!r} (valid: {', '.join(KINDS)})")
        if self.fs <= 0 or self.n_samples <= 0:
            problems.append(f"fs {self.fs} / n_samples {self.n_samples} must be > 0")
        if self.baseline not in BASELINES:
            problems.append(f"baseline {self.baseline!r} (valid: {', '.join(BASELINES)})")
        if self.normalise not in NORMALISATIONS:
            problems.append(f"normalise {self.normalise!r} (valid: {', '.join(NORMALISATIONS)})")
        if self.resample_padding not in RESAMPLE_PADDING:
            problems.append(f"resample_padding {self.resample_padding!r} (valid: {', '.join(RESAMPLE_PADDING)})")
        if self.bandpass_hz is not None and not 0 < self.bandpass_hz[0] < self.bandpass_hz[1]:
            problems.append(f"bandpass_hz {self.bandpass_hz} must be (low, high) with 0 < low < high")
        if (self.scaler_mean is None) != (self.scaler_scale is None):
            problems.append("scaler_mean and scaler_scale go together")
        if self.scaler_mean is not None and not len(self.scaler_mean) == len(self.scaler_scale or ()) == len(self.leads):
            problems.append(f"the scaler needs one mean and one scale per lead ({len(self.leads)})")
        if self.short_record != "zero_pad":
            problems.append(f"short_record {self.short_record!r} (valid: zero_pad)")
        if problems:
            raise ValueError("invalid input contract: " + "; ".join(problems))

    @property
    def window_s(self) -> float:
        return self.n_samples / self.fs

    @property
    def has_scaler(self) -> bool:
        return self.scaler_mean is not None

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (lists, not tuples): stored in checkpoints, scorers and MLflow."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> InputContract:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"input contract has unknown field(s) {unknown}")
        return cls(**d)

    def deterministic_key(self) -> str:
        """Hash of what the cached, per-record part depends on (steps 1-4): two contracts with the same key
        share one cache of an ingested cohort."""
        det = {"fs": self.fs, "bandpass_hz": self.bandpass_hz, "resample_padding": self.resample_padding,
               "baseline": self.baseline, "normalise_record": self.normalise == "record_robust"}
        if self.baseline == "als":
            det.update(als=(self.als_lambda, self.als_p, self.als_iter))
        if self.normalise == "record_robust":
            det.update(outlier_sigma=self.outlier_sigma, clamp=self.clamp)
        return hashlib.sha256(json.dumps(det, sort_keys=True).encode()).hexdigest()[:16]

    def describe(self) -> str:
        """One line for logs and the README: rate, window and steps."""
        steps = []
        if self.bandpass_hz:
            steps.append(f"band-pass {self.bandpass_hz[0]:g}-{self.bandpass_hz[1]:g} Hz")
        steps.append(f"resample to {self.fs:g} Hz ({self.resample_padding} padding)")
        if self.baseline == "als":
            steps.append("ALS baseline")
        if self.normalise == "record_robust":
            steps.append(f"robust whole-record z-score, clamp +/-{self.clamp:g}")
        steps.append(f"first/random {self.window_s:g} s window")
        if self.normalise == "window_group_z":
            steps.append(f"clip +/-{self.clip_sigma:g} sigma, group-wise z-score")
        if self.has_scaler:
            steps.append("per-lead scaler")
        return f"{self.kind}: " + ", ".join(steps)


def paper_contract(leads: tuple[str, ...] = STANDARD_LEADS) -> InputContract:
    """The StenCE code's input for both backbones (arXiv 2606.02605; see ../shared/spec/method.md)."""
    return InputContract("paper", PAPER_FS, int(round(PAPER_FS * PAPER_WINDOW_S)), tuple(leads),
                         source="StenCE paper (arXiv 2606.02605): 500 Hz, 3 s, ALS, 4 sigma clip, group-wise z")


def project_contract(data: Any) -> InputContract:
    """The paper's steps at the rate, window and settings of a `DataConfig` (or its dict)."""
    g = data.get if isinstance(data, dict) else lambda k, d=None: getattr(data, k, d)
    fs = float(g("fs", PAPER_FS))
    return InputContract(
        "project", fs, int(round(float(g("window_s", PAPER_WINDOW_S)) * fs)), tuple(g("leads", STANDARD_LEADS)),
        als_lambda=float(g("als_lambda", ALS_DEFAULTS[0])), als_p=float(g("als_p", ALS_DEFAULTS[1])),
        als_iter=int(g("als_iter", ALS_DEFAULTS[2])), clip_sigma=float(g("clip_sigma", CLIP_SIGMA_DEFAULT)),
        source="stence data.* config",
    )


def otis_contract(fs: float, window_s: float, leads: tuple[str, ...] = STANDARD_LEADS) -> InputContract:
    """OTIS upstream: robust whole-record normalisation, clamp +/- 3, first `time_steps` samples. Upstream does
    not filter or resample; the rate is the one the data is stored at (`data.fs` here)."""
    return InputContract(
        "otis", float(fs), int(round(window_s * fs)), tuple(leads), baseline="none", normalise="record_robust",
        source="oetu/otis e034a4b util/preprocess.py (norm_mode sample, outliers 3, clamp 3) + "
               "util/dataset.py TimeSeriesDataset (first time_steps)",
    )


def echoingecg_contract(leads: tuple[str, ...] = STANDARD_LEADS, scaler: tuple | None = None) -> InputContract:
    """EchoingECG upstream: band-pass 0.5-40 Hz, resample to 100 Hz (median padding), 10 s, per-lead scaler."""
    mean, scale = scaler if scaler is not None else (None, None)
    return InputContract(
        "echoingecg", 100.0, 1000, tuple(leads), bandpass_hz=(0.5, 40.0), resample_padding="median",
        baseline="none", normalise="none",
        scaler_mean=None if mean is None else tuple(float(v) for v in mean),
        scaler_scale=None if scale is None else tuple(float(v) for v in scale),
        source="kkianamm/EchoingECG 60da543 src/datasets/helpers.py downsample_ecg + scale_ecg",
    )


def native_kind(encoder_name: str) -> str | None:
    """The upstream contract of a registered backbone name, or None (trained from scratch only)."""
    if encoder_name.startswith("otis"):
        return "otis"
    if encoder_name.startswith("echoingecg"):
        return "echoingecg"
    return None


def resolve_contract(cfg: Any, scaler: tuple | None = None) -> InputContract:
    """The contract `model.contract` selects for `model.ecg`.

    "auto" is the backbone's native contract when public weights are loaded (`model.ecg_checkpoint`), else
    the project's; "native" is the backbone's upstream contract; "paper" the paper's; "project" the data.*
    settings. `scaler` is (mean, scale) in `data.leads` order, from `model.ecg_scaler`."""
    choice = str(getattr(cfg.model, "contract", "auto"))
    if choice not in MODEL_CONTRACT_CHOICES:
        raise ValueError(f"model.contract {choice!r}: use one of {', '.join(MODEL_CONTRACT_CHOICES)}")
    native = native_kind(cfg.model.ecg)
    if choice == "native" and native is None:
        raise ValueError(f"model.contract native: {cfg.model.ecg!r} has no upstream contract (use project or paper)")
    kind = choice
    if choice == "auto":
        kind = native if (native and cfg.model.ecg_checkpoint) else "project"
    elif choice == "native":
        kind = native
    leads = tuple(cfg.data.leads)
    if kind == "echoingecg":
        return echoingecg_contract(leads, scaler)
    if kind == "otis":
        c = otis_contract(cfg.data.fs, cfg.data.window_s, leads)
    elif kind == "paper":
        c = paper_contract(leads)
    else:
        c = project_contract(cfg.data)
    if scaler is not None:  # an explicit scaler is honoured by any contract (the paper uses none)
        c = replace(c, scaler_mean=tuple(float(v) for v in scaler[0]), scaler_scale=tuple(float(v) for v in scaler[1]))
    return c


def contract_of_spec(spec: dict[str, Any], config: dict[str, Any] | None = None) -> InputContract:
    """The contract in an encoder's `input_spec`; checkpoints written before contracts existed get the project
    contract of their rate, window and leads with the `data.*` settings of their stored config."""
    if spec.get("contract"):
        return InputContract.from_dict(dict(spec["contract"]))
    data = dict((config or {}).get("data") or {})
    data.update(fs=float(spec["fs"]), window_s=int(spec["n_samples"]) / float(spec["fs"]), leads=tuple(spec["leads"]))
    return project_contract(data)


__all__ = [
    "InputContract", "KINDS", "MODEL_CONTRACT_CHOICES", "contract_of_spec", "echoingecg_contract", "native_kind",
    "otis_contract", "paper_contract", "project_contract", "resolve_contract",
]
