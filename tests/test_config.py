"""Config: YAML + dotted overrides, unknown keys rejected, round trip through dicts."""

import pytest

from stence.config import (
    Config,
    ConfigError,
    apply_overrides,
    config_hash,
    flatten,
    from_dict,
    load_config,
    save_config,
    to_dict,
)


def test_defaults_round_trip():
    cfg = Config()
    assert from_dict(to_dict(cfg)) == cfg


def test_dotted_overrides_typed():
    cfg = apply_overrides(Config(), ["optim.lr_ecg=3e-5", "loss.learnable_temperature=true", "data.fs=250"])
    assert cfg.optim.lr_ecg == pytest.approx(3e-5) and isinstance(cfg.data.fs, int)
    assert cfg.loss.learnable_temperature is True
    cfg2 = apply_overrides(cfg, {"data.leads": ["I", "II"]})
    assert cfg2.data.leads == ("I", "II")
    assert Config().optim.lr_ecg != cfg.optim.lr_ecg  # frozen original untouched


@pytest.mark.parametrize("bad", ["optim.lr=1", "nosection.x=1", "optim=3", "optim.lr_ecg"])
def test_unknown_or_malformed_keys_rejected(bad):
    with pytest.raises(ConfigError):
        apply_overrides(Config(), [bad])


def test_bad_types_rejected():
    with pytest.raises(ConfigError):
        apply_overrides(Config(), ["data.fs=abc"])
    with pytest.raises(ConfigError):
        apply_overrides(Config(), ["data.fs=2.5"])
    with pytest.raises(ConfigError):
        from_dict({"data": {"bogus": 1}})


def test_yaml_file_then_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    save_config(apply_overrides(Config(), ["loss.w_sten=1.0"]), p)
    cfg = load_config(p, ["loss.temperature=0.1"])
    assert cfg.loss.w_sten == 1.0 and cfg.loss.temperature == 0.1
    assert config_hash(cfg) != config_hash(Config())
    assert "loss.w_sten" in flatten(to_dict(cfg))


def test_the_cli_makes_every_path_field_absolute_once(tmp_path, monkeypatch):
    """Ray workers and Tune trials run in other working directories: a relative `data.cohort=runs/cohort`
    must reach them as an absolute path (URIs and empty fields pass through)."""
    import argparse

    from stence.commands._common import config_from_args
    from stence.config import flatten, path_keys, to_dict

    monkeypatch.chdir(tmp_path)
    args = argparse.Namespace(config=None, set=["data.cohort=runs/cohort", "model.ecg_checkpoint=w/otis.pth",
                                                "downstream.encoder_checkpoint=models:/m@champion",
                                                "train.storage_path=s3://bucket/x"])
    flat = flatten(to_dict(config_from_args(args)))
    assert flat["data.cohort"] == str(tmp_path / "runs" / "cohort")
    assert flat["model.ecg_checkpoint"] == str(tmp_path / "w" / "otis.pth")
    assert flat["downstream.encoder_checkpoint"] == "models:/m@champion"
    assert flat["train.storage_path"] == "s3://bucket/x"
    assert flat["feature.frame_checkpoint"] == ""
    assert {"data.cohort", "train.storage_path", "ingest.site_dir", "model.angio_checkpoint"} <= set(path_keys())


def test_worker_resources_are_validated_when_the_cli_builds_the_config() -> None:
    import argparse

    from stence.commands._common import config_from_args
    from stence.train.driver import parse_worker_resources

    assert parse_worker_resources(("spot=1", "ssd=0.5")) == {"spot": 1.0, "ssd": 0.5}
    for bad in ("spot", "=1", "GPU=1", "spot=0", "spot=x"):
        with pytest.raises(SystemExit, match="train.worker_resources"):
            config_from_args(argparse.Namespace(config=None, set=[f"train.worker_resources=[{bad}]"]))
