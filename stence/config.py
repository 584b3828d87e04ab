"""Typed, frozen configuration for every stage of the platform.

One `Config` holds small frozen dataclasses, one per concern. It loads from YAML, takes dotted overrides
(`optim.lr_ecg=3e-5`), rejects unknown keys with the list of valid ones, and round-trips through plain
dicts so the resolved config can be stored in every checkpoint and MLflow run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import Any

import yaml

STANDARD_LEADS: tuple[str, ...] = ("I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6")

THRESHOLD_TASKS: dict[str, tuple[float, float]] = {
    # name: (a, b): label <= a negative, label >= b positive, a < label < b dropped
    "0_100": (0.0, 100.0),
    "0_90": (0.0, 90.0),
    "lt70_ge70": (69.999, 70.0),
    "le50_ge99": (50.0, 99.0),
}


class ConfigError(ValueError):
    """A configuration key or value is wrong; the message says which and what is valid."""


def path_field(default: str = "") -> Any:
    """A config field holding a filesystem path: `absolute_paths` makes it absolute once, where the CLI
    builds the config, so no stage, Ray worker or Tune trial depends on its working directory."""
    return field(default=default, metadata={"path": True})


@dataclass(frozen=True)
class DataConfig:
    cohort: str = path_field("runs/cohort")  # ingested cohort folder (manifest.parquet, caches)
    fs: int = 500  # model sampling rate, Hz; every ECG is resampled to it at ingest
    leads: tuple[str, ...] = STANDARD_LEADS  # lead order fed to the encoder
    window_s: float = 3.0  # crop length in seconds (3 s x 500 Hz = 1500 samples)
    pair_window_days: int = 30  # ECGs within +/- this many days of the angiogram are paired with it
    split_fractions: tuple[float, float, float] = (0.6, 0.2, 0.2)  # train / val / test, by patient
    split_seed: int = 0  # seed of the stratified patient split
    als_lambda: float = 1e7  # asymmetric least squares baseline: smoothness
    als_p: float = 0.3  # asymmetric least squares baseline: asymmetry
    als_iter: int = 5  # asymmetric least squares baseline: iterations
    clip_sigma: float = 4.0  # per-crop clipping at +/- this many standard deviations
    frame_size: int = 64  # key frames are resized to frame_size x frame_size at ingest
    key_frames: int = 1  # key frames kept per view
    augment: bool = True  # paper's ECG augmentations during training
    view_drop_max: float = 0.3  # training drops U(0, view_drop_max) of a study's views (>= 1 kept)
    num_workers: int = 0  # DataLoader worker processes per training worker


@dataclass(frozen=True)
class IngestConfig:
    salt_env: str = "STENCE_SALT"  # environment variable holding the site's pseudonymisation secret
    # or a site-only file holding it (first line). The secret itself is never a config value: configs are
    # saved with every run, checkpoint and registered model
    salt_file: str = path_field()
    processes: int = 0  # parallel decode processes; 0 = all cores
    # site-only map of file pseudonyms to original paths (holds identifiers); "" = <cohort>.site-identifiers
    site_dir: str = path_field()
    min_valid_fraction: float = 0.5  # an ECG with less finite signal than this is rejected
    # per-file bounds checked from the header before decoding (stence/data/limits.py); a file over one is
    # quarantined as file_over_limit, so a crafted header cannot exhaust memory or time
    min_fs: float = 50.0  # Hz, lowest plausible ECG sampling rate
    max_fs: float = 20000.0  # Hz, highest plausible ECG sampling rate
    max_duration_s: float = 600.0  # longest ECG record, seconds
    max_channels: int = 64  # signals in one ECG record
    max_header_kb: int = 1024  # size of a WFDB header or an XML export
    max_frames: int = 2000  # frames of one XA cine
    max_decoded_mb: float = 1024.0  # decoded size of one file, MiB


@dataclass(frozen=True)
class FeatureConfig:
    frame_encoder: str = "convstem_tiny"  # registry name of the frame encoder (paper: dinov2_vits14)
    frame_checkpoint: str = path_field()  # local DINOv2 weights or a stage-A frame_encoder.pt; empty = seeded random init
    feature_dim: int = 64  # width of cached patch features (paper: 512)
    image_size: int = 64  # encoder input size in pixels (paper: 518)
    variants: int = 2  # augmented variants per training study (validation uses variant 0, unaugmented)
    batch_size: int = 16  # studies per Ray Data batch
    actors: int = 2  # Ray Data actor pool size
    seed: int = 0  # seeds the frame encoder init and the augmentations


@dataclass(frozen=True)
class StageAConfig:
    """Stage A (`stence train-angio`, the angiography stenosis model): how it trains. None of these change the
    cached features, so none is part of the feature cache key (stence/train/features.py)."""

    # stage A trains the frame encoder end to end with the aggregator on the cached key frames and exports it:
    # "auto" = only without feature.frame_checkpoint (random init gives useless frozen features), "true" / "false"
    train_frame_encoder: str = "auto"
    encoder_lr_scale: float = 1.0  # end-to-end stage A: frame-encoder learning rate = optim.lr_angio x this
    train_rotate_deg: float = 20.0  # end-to-end stage A: training views rotated U(-x, x) deg (+-10 % scale)


@dataclass(frozen=True)
class ModelConfig:
    ecg: str = "otis_tiny"  # registry name of the ECG encoder
    ecg_checkpoint: str = path_field()  # local OTIS / EchoingECG weights; empty = random init
    # EchoingECG per-lead input scaler, JSON/npz of mean_ and scale_ (`stence scaler convert ecg_scaler.pkl`
    # makes it); empty = identity
    ecg_scaler: str = path_field()
    lead_order: str = "standard"  # "standard" or "mimic" (aVF before aVL, as OTIS pretraining)
    # input contract (stence/data/contract.py): "auto" = the backbone's upstream contract when public weights
    # are loaded (model.ecg_checkpoint), else "project" (data.* settings); "native", "paper" or "project"
    contract: str = "auto"
    angio_dim: int = 64  # aggregator width (paper: 512); equals feature.feature_dim
    angio_layers: int = 2  # decoder layers
    angio_heads: int = 4  # attention heads
    angio_ffn: int = 256  # feed-forward width (paper: 2048)
    angio_dropout: float = 0.1
    angulation_embedding: bool = True  # add a view-angulation embedding to patch tokens
    frozen_no_cls: bool = False  # ablation: frozen aggregator, study embedding from the patient query
    proj_dim: int = 256  # shared embedding width of both projection heads
    angio_checkpoint: str = path_field()  # stage A checkpoint used to initialise the aggregator in stage B


@dataclass(frozen=True)
class LossConfig:
    w_sten: float = 0.3  # weight of the stenosis BCE on the angiography branch
    temperature: float = 0.2  # CLIP temperature (initial value if learnable)
    learnable_temperature: bool = False
    gather: bool = True  # all-gather negatives across data-parallel workers


@dataclass(frozen=True)
class OptimConfig:
    lr_ecg: float = 1e-4  # ECG tower + head (paper: 1e-5 over 500 epochs)
    lr_angio: float = 1e-4  # angiography tower + head
    weight_decay: float = 1e-5
    warmup_epochs: int = 1
    warmup_start: float = 1e-3  # warm-up starts at this fraction of the learning rate
    min_lr: float = 1e-6
    epochs: int = 10
    batch_size: int = 32  # global batch, split over workers
    grad_clip: float = 0.0  # max grad norm; 0 = off


@dataclass(frozen=True)
class TrainConfig:
    name: str = "stence"  # run name; the same (storage_path, name) resumes
    storage_path: str = path_field("runs/ray")  # checkpoints and Tune state (shared path or s3:// on a cluster)
    workers: int = 2  # Ray Train workers (0 = in-process local mode)
    gpus: int = 0  # GPUs per worker
    cpus_per_worker: int = 1
    # custom resources each Ray Train worker also asks for, "NAME=AMOUNT" (e.g. spot=1): the workers then run
    # only on nodes that offer them (ray start --resources); CPU and GPU are cpus_per_worker and gpus
    worker_resources: tuple[str, ...] = ()
    seed: int = 0
    knn_every: int = 1  # run the kNN probe every k epochs
    knn_k: int = 5
    knn_task: str = "0_100"  # threshold task of the kNN probe
    # checkpoints and sweep trials are ranked by the mean of the last n kNN AUROCs (val/knn_auroc_smooth):
    # one kNN AUROC on a few dozen validation patients is noisy, and its best epoch is often a lucky one
    knn_smooth: int = 3
    max_failures: int = 2  # worker-group restarts from the last checkpoint
    keep_checkpoints: int = 2  # checkpoints kept (best by the smoothed kNN AUROC)


@dataclass(frozen=True)
class DownstreamConfig:
    task: str = "0_100"  # threshold task name, "a_b" custom, or "echonext"
    mode: str = "probe"  # "probe" (head only) or "finetune" (whole encoder)
    encoder_checkpoint: str = path_field()  # StenCE checkpoint; empty = baseline (random or model.ecg_checkpoint)
    lr_head: float = 1e-3
    lr_backbone: float = 1e-4
    weight_decay: float = 0.05
    label_smoothing: float = 0.1
    epochs: int = 20
    # at least this many optimiser steps (ours): each epoch makes enough passes over the training data; on a
    # small cohort a few epochs are a few steps, and a linear head left near its random init scores by luck
    min_steps: int = 0
    batch_size: int = 64
    warmup_epochs: int = 2
    train_fraction: float = 1.0  # seeded stratified subset of the training split
    hidden: int = 0  # 0 = linear head
    bootstrap: int = 1000  # bootstrap resamples for confidence intervals
    echonext_root: str = path_field()  # EchoNext release folder (task "echonext")


@dataclass(frozen=True)
class TrackingConfig:
    enabled: bool = True
    uri: str = ""  # empty = MLFLOW_TRACKING_URI or sqlite under runs/
    experiment: str = "stence"
    registered_model: str = "stence-ecg-encoder"


@dataclass(frozen=True)
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    ingest: IngestConfig = field(default_factory=IngestConfig)
    feature: FeatureConfig = field(default_factory=FeatureConfig)
    stage_a: StageAConfig = field(default_factory=StageAConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    downstream: DownstreamConfig = field(default_factory=DownstreamConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)


# Keys that moved to another section: old dotted key -> new one. Configs saved before the move (in checkpoints,
# MLflow runs, registered models), YAML files and `--set` overrides that still name an old key keep working:
# `from_dict` and `apply_overrides` move it to its new place (`migrate_moved_keys`).
MOVED_KEYS: dict[str, str] = {
    "feature.train_frame_encoder": "stage_a.train_frame_encoder",
    "feature.encoder_lr_scale": "stage_a.encoder_lr_scale",
    "feature.train_rotate_deg": "stage_a.train_rotate_deg",
}


def _moved_conflict(old: str, new: str, old_value: Any, new_value: Any) -> ConfigError:
    return ConfigError(f"{old} is the old name of {new}, and the two disagree ({old_value!r} != {new_value!r}); "
                       f"set only {new}")


def migrate_moved_keys(d: dict[str, Any]) -> dict[str, Any]:
    """A nested config dict with every old key of `MOVED_KEYS` moved to its new place (a copy; the input is
    left as it is). The same setting under both names with different values is a ConfigError."""
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in d.items()}
    for old, new in MOVED_KEYS.items():
        old_section, old_key = old.split(".")
        new_section, new_key = new.split(".")
        src = out.get(old_section)
        if not isinstance(src, dict) or old_key not in src:
            continue
        value = src.pop(old_key)
        dst = out.setdefault(new_section, {})
        if not isinstance(dst, dict):
            raise ConfigError(f"{new_section}: expected a mapping, got {type(dst).__name__}")
        if new_key in dst and dst[new_key] != value:
            raise _moved_conflict(old, new, value, dst[new_key])
        dst[new_key] = value
    return out


# ---------------------------------------------------------------------------------------------------
# dict / YAML round trip and dotted overrides


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict (tuples become lists) for YAML, JSON, checkpoints and MLflow."""
    out: dict[str, Any] = {}
    for f in fields(cfg):
        v = getattr(cfg, f.name)
        if is_dataclass(v):
            out[f.name] = to_dict(v)
        elif isinstance(v, tuple):
            out[f.name] = list(v)
        else:
            out[f.name] = v
    return out


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if origin is tuple:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        args = typing.get_args(tp)
        item_tp = args[0] if args else str
        return tuple(_coerce(v, item_tp, key) for v in value)
    if origin in (typing.Union, types.UnionType):
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "0", "no", "off"):
            return False
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise ConfigError(f"{key}: expected a boolean, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        try:
            f = float(value)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{key}: expected an integer, got {value!r}") from e
        if f != int(f):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return int(f)
    if tp is float:
        try:
            return float(value)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{key}: expected a number, got {value!r}") from e
    if tp is str:
        return "" if value is None else str(value)
    return value


SECRET_KEYS = {"ingest.salt"}  # never config values (see IngestConfig.salt_file)


def _refuse_secret(key: str) -> None:
    if key in SECRET_KEYS:
        raise ConfigError(f"{key} is refused: a config is saved with every run, checkpoint and model, so the "
                          "pseudonymisation secret must not be in one; set the environment variable STENCE_SALT "
                          "or ingest.salt_file=/site/only/secret")


def from_dict(d: dict[str, Any], cls: type = Config, prefix: str = "") -> Any:
    """Build a (nested) config dataclass from a dict, rejecting unknown keys."""
    if not isinstance(d, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {type(d).__name__}")
    if cls is Config and not prefix:
        d = migrate_moved_keys(d)  # a config saved (or written) before a key moved section
    for k in d:
        _refuse_secret(prefix + str(k))
    hints = _field_types(cls)
    valid = {f.name for f in fields(cls)}
    unknown = set(d) - valid
    if unknown:
        raise ConfigError(
            f"unknown config key(s) {sorted(prefix + k for k in unknown)}; valid under "
            f"{prefix.rstrip('.') or 'top level'}: {sorted(valid)}"
        )
    kwargs: dict[str, Any] = {}
    for name, value in d.items():
        tp = hints[name]
        if is_dataclass(tp):
            kwargs[name] = from_dict(value, tp, prefix + name + ".")
        else:
            kwargs[name] = _coerce(value, tp, prefix + name)
    return cls(**kwargs)


def _parse_scalar(text: str) -> Any:
    """`--set` values are YAML scalars: 1e-4, true, [a, b], "x"."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(cfg: Config, overrides: dict[str, Any] | list[str] | None) -> Config:
    """Return a new config with dotted-key overrides applied ({"optim.lr_ecg": 1e-5} or ["a.b=1"])."""
    if not overrides:
        return cfg
    if isinstance(overrides, (list, tuple)):
        pairs: dict[str, Any] = {}
        for item in overrides:
            if "=" not in item:
                raise ConfigError(f"override {item!r} is not of the form section.key=value")
            k, v = item.split("=", 1)
            pairs[k.strip()] = _parse_scalar(v)
        overrides = pairs
    renamed: dict[str, Any] = {}  # an old key name still works: it sets the new key
    given_as: dict[str, str] = {}
    for key, value in overrides.items():
        new = MOVED_KEYS.get(key, key)
        if new in renamed and given_as[new] != key and renamed[new] != value:
            old_value, new_value = (value, renamed[new]) if key != new else (renamed[new], value)
            raise _moved_conflict(key if key != new else given_as[new], new, old_value, new_value)
        renamed[new], given_as[new] = value, key
    nested = to_dict(cfg)
    for key, value in renamed.items():
        _refuse_secret(key)
        parts = key.split(".")
        node: Any = nested
        for i, p in enumerate(parts[:-1]):
            if not isinstance(node, dict) or p not in node:
                raise ConfigError(f"unknown config key {key!r}: no section {'.'.join(parts[: i + 1])!r}")
            node = node[p]
        if not isinstance(node, dict) or parts[-1] not in node:
            valid = sorted(flatten(to_dict(cfg)))
            raise ConfigError(f"unknown config key {key!r}; valid keys: {', '.join(valid)}")
        if isinstance(node[parts[-1]], dict):
            raise ConfigError(f"{key!r} is a section, not a value")
        node[parts[-1]] = value
    return from_dict(nested)


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | list[str] | None = None) -> Config:
    """Defaults, then a YAML file (if given), then dotted overrides."""
    cfg = Config()
    if path:
        data = yaml.safe_load(Path(path).read_text()) or {}
        cfg = from_dict(data)
    return apply_overrides(cfg, overrides)


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def _is_uri(value: str) -> bool:
    """s3://..., file://..., models:/NAME@ALIAS, runs:/ID/...: not a local path."""
    return "://" in value or value.startswith(("models:/", "runs:/"))


def path_keys(cfg: Any = None, prefix: str = "") -> list[str]:
    """Dotted keys of every path field (`data.cohort`, `train.storage_path`, ...)."""
    cls = type(cfg) if cfg is not None else Config
    out: list[str] = []
    for f in fields(cls):
        tp = _field_types(cls)[f.name]
        if is_dataclass(tp):
            out += path_keys(tp(), prefix + f.name + ".")
        elif f.metadata.get("path"):
            out.append(prefix + f.name)
    return out


def absolute_paths(cfg: Config, base: str | Path | None = None) -> Config:
    """The config with every non-empty local path field made absolute against `base` (default: the
    current directory); URIs pass through."""
    root = Path(base) if base is not None else Path.cwd()
    changes: dict[str, str] = {}
    flat = flatten(to_dict(cfg))
    for key in path_keys():
        value = str(flat[key] or "")
        if value and not _is_uri(value):
            changes[key] = str((root / Path(value).expanduser()).resolve())
    return apply_overrides(cfg, changes) if changes else cfg


def config_hash(cfg: Config) -> str:
    """Short stable hash of the resolved config (tags, cache keys). A moved key is hashed under its old name
    (`MOVED_KEYS`): the same settings keep the same hash, so run tags and the downstream run names (resume)
    built from it do not change when a key moves section."""
    d = to_dict(cfg)
    for old, new in MOVED_KEYS.items():
        old_section, old_key = old.split(".")
        new_section, new_key = new.split(".")
        d.setdefault(old_section, {})[old_key] = d[new_section].pop(new_key)
        if not d[new_section]:
            del d[new_section]  # a section made of moved keys only did not exist before
    blob = json.dumps(d, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def update(cfg: Any, **changes: Any) -> Any:
    """`dataclasses.replace` re-exported for readability at call sites."""
    return replace(cfg, **changes)


__all__ = [
    "Config",
    "ConfigError",
    "DataConfig",
    "DownstreamConfig",
    "FeatureConfig",
    "IngestConfig",
    "LossConfig",
    "ModelConfig",
    "OptimConfig",
    "MOVED_KEYS",
    "STANDARD_LEADS",
    "StageAConfig",
    "THRESHOLD_TASKS",
    "TrackingConfig",
    "TrainConfig",
    "absolute_paths",
    "apply_overrides",
    "config_hash",
    "flatten",
    "from_dict",
    "load_config",
    "migrate_moved_keys",
    "path_field",
    "path_keys",
    "save_config",
    "to_dict",
    "dataclasses",
]
