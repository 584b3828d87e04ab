"""Stage A's training knobs in their own config section (`stage_a`): the feature cache key and the config hash
are what they were while the knobs sat in `feature`, and configs that still use the old keys keep working."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import mlflow
import pytest
import torch
import yaml

from stence.config import (
    MOVED_KEYS,
    Config,
    ConfigError,
    StageAConfig,
    apply_overrides,
    config_hash,
    flatten,
    from_dict,
    load_config,
    to_dict,
)
from stence.models.checkpoint import save_aggregator
from stence.models.registry import build_aggregator
from stence.tracking.runs import start_run
from stence.train.features import feature_key
from tests.ray_fixture import shared_mlflow_db

STAGE_A_KNOBS = ("train_frame_encoder", "encoder_lr_scale", "train_rotate_deg")
OTHER_STAGE_A = {"train_frame_encoder": "false", "encoder_lr_scale": 3.0, "train_rotate_deg": 0.0}
# computed before the knobs moved out of `feature`: a cached feature folder and a run's hash tag stay valid
DEFAULT_FEATURE_KEY = "dbb68d005169"
DEFAULT_CONFIG_HASH = "95d745c8d9ae"
OTHER_STAGE_A_CONFIG_HASH = "b672cca53e7c"


def _cohort() -> SimpleNamespace:
    return SimpleNamespace(fingerprint="cohort-fp-0123", meta={"data_config": {"frame_size": 64}})


def _legacy_dict(cfg: Config) -> dict:
    """`to_dict` of `cfg` laid out as before the move: the stage-A knobs under `feature`, no `stage_a`."""
    d = to_dict(cfg)
    d["feature"].update(d.pop("stage_a"))
    return d


def test_the_knobs_live_in_their_own_section() -> None:
    cfg = Config()
    assert cfg.stage_a == StageAConfig()
    assert set(MOVED_KEYS) == {f"feature.{k}" for k in STAGE_A_KNOBS}
    assert set(MOVED_KEYS.values()) == {f"stage_a.{k}" for k in STAGE_A_KNOBS}
    d = to_dict(cfg)
    assert list(d["stage_a"]) == list(STAGE_A_KNOBS)
    assert not set(STAGE_A_KNOBS) & set(d["feature"])
    assert (d["stage_a"]["train_frame_encoder"], d["stage_a"]["encoder_lr_scale"],
            d["stage_a"]["train_rotate_deg"]) == ("auto", 1.0, 20.0)  # the defaults did not change


def test_feature_key_is_pinned_and_ignores_stage_a() -> None:
    assert feature_key(_cohort(), Config()) == DEFAULT_FEATURE_KEY
    other = apply_overrides(Config(), {f"stage_a.{k}": v for k, v in OTHER_STAGE_A.items()})
    assert feature_key(_cohort(), other) == DEFAULT_FEATURE_KEY
    assert feature_key(_cohort(), apply_overrides(Config(), {"feature.variants": 3})) != DEFAULT_FEATURE_KEY


def test_config_hash_is_pinned_across_the_move() -> None:
    assert config_hash(Config()) == DEFAULT_CONFIG_HASH
    other = apply_overrides(Config(), {f"stage_a.{k}": v for k, v in OTHER_STAGE_A.items()})
    assert config_hash(other) == OTHER_STAGE_A_CONFIG_HASH
    assert config_hash(other) != config_hash(Config())
    assert config_hash(from_dict(to_dict(other))) == OTHER_STAGE_A_CONFIG_HASH


def test_a_saved_config_with_the_old_keys_is_migrated() -> None:
    new = apply_overrides(Config(), {f"stage_a.{k}": v for k, v in OTHER_STAGE_A.items()})
    old = _legacy_dict(new)  # e.g. the config of a checkpoint or MLflow run written before the move
    assert "stage_a" not in old and old["feature"]["encoder_lr_scale"] == 3.0
    assert from_dict(old) == new
    assert old["feature"]["encoder_lr_scale"] == 3.0  # the caller's dict is left as it was
    # both names given: the same value is fine, different values are refused
    assert from_dict({**old, "stage_a": {"encoder_lr_scale": 3.0}}) == new
    with pytest.raises(ConfigError, match="feature.encoder_lr_scale is the old name of stage_a.encoder_lr_scale"):
        from_dict({**old, "stage_a": {"encoder_lr_scale": 2.0}})


def test_yaml_and_overrides_with_the_old_keys_still_work(tmp_path: Path) -> None:
    path = tmp_path / "old.yaml"
    path.write_text(yaml.safe_dump({"feature": {"train_frame_encoder": "false", "variants": 3},
                                    "optim": {"epochs": 2}}))
    cfg = load_config(path, ["feature.train_rotate_deg=5", "feature.encoder_lr_scale=0.5"])
    assert cfg.stage_a == StageAConfig(train_frame_encoder="false", encoder_lr_scale=0.5, train_rotate_deg=5.0)
    assert cfg.feature.variants == 3 and cfg.optim.epochs == 2
    assert cfg == load_config(None, ["stage_a.train_frame_encoder='false'", "feature.variants=3", "optim.epochs=2",
                                     "stage_a.train_rotate_deg=5", "stage_a.encoder_lr_scale=0.5"])
    assert apply_overrides(Config(), {"feature.train_rotate_deg": 1.0, "stage_a.train_rotate_deg": 1.0}) \
        .stage_a.train_rotate_deg == 1.0
    for pair in ({"feature.train_rotate_deg": 1.0, "stage_a.train_rotate_deg": 2.0},
                 {"stage_a.train_rotate_deg": 2.0, "feature.train_rotate_deg": 1.0}):
        with pytest.raises(ConfigError, match="old name of stage_a.train_rotate_deg"):
            apply_overrides(Config(), pair)
    with pytest.raises(ConfigError, match="unknown config key"):
        apply_overrides(Config(), ["stage_a.frame_encoder=x"])  # only the moved knobs are in the section


def test_checkpoints_and_mlflow_params_show_the_new_section(tmp_path: Path, tmp_path_factory) -> None:
    cfg = apply_overrides(Config(), {"stage_a.encoder_lr_scale": 2.5})
    save_aggregator(tmp_path / "agg.pt", build_aggregator(cfg), to_dict(cfg))
    saved = torch.load(tmp_path / "agg.pt", map_location="cpu", weights_only=True)["config"]
    assert saved["stage_a"]["encoder_lr_scale"] == 2.5 and "encoder_lr_scale" not in saved["feature"]
    assert from_dict(saved) == cfg

    uri = shared_mlflow_db(tmp_path_factory)
    tracked = apply_overrides(cfg, {"tracking.uri": uri, "tracking.experiment": "stage-a-config"})
    params = mlflow.MlflowClient(uri).get_run(start_run(tracked, "r")).data.params
    assert params["stage_a.encoder_lr_scale"] == "2.5" and params["stage_a.train_frame_encoder"] == "auto"
    assert not {f"feature.{k}" for k in STAGE_A_KNOBS} & set(params)
    assert {f"stage_a.{k}" for k in STAGE_A_KNOBS} <= set(flatten(to_dict(tracked)))
