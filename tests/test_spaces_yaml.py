"""Search spaces as YAML files: the built-ins ship as package data and load to the former Python dicts; a
user's file builds the same Tune space as the equivalent dict; a bad file is refused with its key named,
before anything starts; the sweep's parent run keeps the space."""

from __future__ import annotations

import sys
from importlib import resources
from pathlib import Path
from typing import Any

import pytest
import yaml

from stence.cli import main
from stence.config import Config
from stence.tune.spaces import SPACES, SearchSpace, SpaceError, build_param_space, is_fixed, load_space
from tests.ray_fixture import shared_mlflow_db

# the built-in spaces as tune/spaces.py held them in Python before they became files
FORMER_SPACES: dict[str, dict[str, Any]] = {
    "default": {
        "kind": "search",
        "params": {
            "loss.w_sten": {"type": "uniform", "low": 0.0, "high": 1.0},
            "loss.temperature": {"type": "loguniform", "low": 0.02, "high": 0.5},
            "optim.lr_ecg": {"type": "loguniform", "low": 1e-5, "high": 1e-3},
            "optim.lr_angio": {"type": "loguniform", "low": 1e-5, "high": 1e-3},
        },
        "points_to_evaluate": [{"loss.w_sten": 0.3, "loss.temperature": 0.2}],
    },
    "ablation": {
        "kind": "variants",
        "variants": [
            {"loss.w_sten": 0.0, "model.contract": "paper"},
            {"loss.w_sten": 0.3, "model.contract": "paper"},
            {"loss.w_sten": 1.0, "model.contract": "paper"},
            {"loss.w_sten": 0.3, "model.contract": "paper", "model.frozen_no_cls": True},
            {"loss.w_sten": 0.3, "model.contract": "paper", "loss.learnable_temperature": True},
            {"loss.w_sten": 0.3, "model.contract": "native"},
        ],
    },
    "smoke": {
        "kind": "search",
        "params": {
            "loss.w_sten": {"type": "uniform", "low": 0.0, "high": 1.0},
            "optim.lr_ecg": {"type": "loguniform", "low": 1e-4, "high": 1e-2},
        },
        "points_to_evaluate": [{"loss.w_sten": 0.3}],
    },
}


def _types(obj: Any) -> Any:
    """The structure with every leaf replaced by its type (1e-5 read as text would differ from a float)."""
    if isinstance(obj, dict):
        return {k: _types(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_types(v) for v in obj]
    return type(obj)


# ---------------------------------------------------------------------------------------------------
# the built-in files


@pytest.mark.parametrize("name", sorted(FORMER_SPACES))
def test_builtin_file_loads_to_the_former_dict(name: str) -> None:
    space = load_space(name)
    assert SPACES[name] == space.data == FORMER_SPACES[name]
    assert _types(space.data) == _types(FORMER_SPACES[name])
    assert yaml.safe_load(space.text) == FORMER_SPACES[name]  # any YAML reader sees the same space
    assert space.name == name and space.fixed == (name == "ablation") == is_fixed(name)


def test_builtin_files_keep_their_comments_and_are_the_only_spaces() -> None:
    assert set(SPACES) == set(FORMER_SPACES)
    assert "# the paper's setting first: W_Sten 0.3, tau 0.2" in load_space("default").text
    assert "backbone its upstream (native) contract" in load_space("ablation").text


def test_builtin_files_are_package_data() -> None:
    folder = resources.files("stence.tune") / "space_files"
    assert sorted(f.name for f in folder.iterdir() if f.name.endswith(".yaml")) == [
        "ablation.yaml", "default.yaml", "smoke.yaml"]  # fmt: skip
    if sys.version_info >= (3, 11):
        import tomllib

        project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
        globs = project["tool"]["setuptools"]["package-data"]["stence.tune"]
        assert all(any(Path("space_files", f.name).match(g) for g in globs) for f in folder.iterdir()
                   if f.name.endswith(".yaml"))  # fmt: skip


# ---------------------------------------------------------------------------------------------------
# a user's file: each kind of error names the key and says what is wrong

P = "kind: search\nparams:\n"
W_STEN = "  loss.w_sten: {type: uniform, low: 0.0, high: 1.0}\n"

BAD = [
    ("unknown_key", P + "  loss.w_stn: {type: uniform, low: 0.0, high: 1.0}\n",
     "params: unknown config key 'loss.w_stn'; close matches: loss.w_sten"),
    ("unknown_type", P + "  loss.w_sten: {type: normal, low: 0.0, high: 1.0}\n",
     "params: loss.w_sten: unknown distribution type 'normal'; valid types: categorical, int, loguniform, uniform"),
    ("low_ge_high", P + "  loss.w_sten: {type: uniform, low: 1.0, high: 0.5}\n",
     "params: loss.w_sten: low (1.0) must be below high (0.5)"),
    ("int_low_eq_high", P + "  train.knn_k: {type: int, low: 5, high: 5}\n",
     "params: train.knn_k: low (5) must be below high (5)"),
    ("loguniform_low_0", P + "  optim.lr_ecg: {type: loguniform, low: 0.0, high: 1.0e-3}\n",
     "params: optim.lr_ecg: loguniform needs 0 < low, got low 0.0"),
    ("point_unknown_key", P + W_STEN + "points_to_evaluate:\n  - {loss.temprature: 0.2}\n",
     "points_to_evaluate[0]: unknown config key 'loss.temprature'; close matches: loss.temperature"),
    ("point_not_searched", P + W_STEN + "points_to_evaluate:\n  - {loss.temperature: 0.2}\n",
     "points_to_evaluate[0]: loss.temperature is not searched (params: loss.w_sten)"),
    ("point_out_of_range", P + W_STEN + "points_to_evaluate:\n  - {loss.w_sten: 2.0}\n",
     "points_to_evaluate[0]: loss.w_sten: 2.0 is outside [0.0, 1.0]"),
    ("variant_unknown_key", "kind: variants\nvariants:\n  - {loss.w_sten: 0.3}\n  - {model.frozen_nocls: true}\n",
     "variants[1]: unknown config key 'model.frozen_nocls'; close matches: model.frozen_no_cls"),
    ("string_for_float", "kind: variants\nvariants:\n  - {loss.w_sten: high}\n",
     "variants[0]: loss.w_sten: expected a number (float), got str 'high'"),
    ("quoted_number_for_float", "kind: variants\nvariants:\n  - {loss.w_sten: '0.3'}\n",
     "variants[0]: loss.w_sten: expected a number (float), got str '0.3'"),
    ("int_for_bool", "kind: variants\nvariants:\n  - {model.frozen_no_cls: 1}\n",
     "variants[0]: model.frozen_no_cls: expected a boolean (bool), got int 1"),
    ("string_bound", P + "  loss.w_sten: {type: uniform, low: '0', high: 1.0}\n",
     "params: loss.w_sten: low: expected a number (float), got str '0'"),
    ("categorical_without_values", P + "  model.contract: {type: categorical}\n",
     "params: model.contract: categorical needs a non-empty list of values"),
    ("categorical_wrong_value_type", P + "  train.knn_k: {type: categorical, values: [3, five]}\n",
     "params: train.knn_k: value 'five': expected an integer (int), got str 'five'"),
    ("uniform_on_a_string_field", P + "  model.contract: {type: uniform, low: 0.0, high: 1.0}\n",
     "params: model.contract: uniform does not fit a config field holding a string; use type categorical"),
    ("uniform_on_an_int_field", P + "  train.knn_k: {type: uniform, low: 1.0, high: 9.0}\n",
     "params: train.knn_k: uniform does not fit a config field holding an integer; use type int"),
    ("missing_bound", P + "  loss.w_sten: {type: uniform, low: 0.0}\n",
     "params: loss.w_sten: uniform needs low and high; high is missing"),
    ("unknown_field", P + "  loss.w_sten: {type: uniform, low: 0.0, high: 1.0, q: 0.1}\n",
     "params: loss.w_sten: unknown field(s) q for type uniform; valid: high, low, type"),
    ("empty_params", "kind: search\nparams: {}\n", "params: empty; a search space needs at least one parameter"),
    ("empty_variants", "kind: variants\nvariants: []\n", "variants: empty"),
    ("empty_file", "", "expected a mapping with kind: search or kind: variants, got an empty document"),
    ("unknown_top_level_key", "kind: search\nparam:\n" + W_STEN,
     "unknown top-level key(s) param for kind search (did you mean params?)"),
    ("variants_key_in_a_search", P + W_STEN + "variants: [{loss.w_sten: 0.3}]\n",
     "unknown top-level key(s) variants for kind search"),
    ("unknown_kind", "kind: grid\n", "kind: got 'grid'; expected search or variants"),
    ("missing_kind", "params:\n" + W_STEN, "kind: missing; expected search or variants"),
    ("duplicate_key", P + W_STEN + W_STEN, "not valid YAML (line 4, column 3): duplicate key 'loss.w_sten'"),
    ("secret_key", "kind: variants\nvariants:\n  - {ingest.salt: x}\n", "unknown config key 'ingest.salt'"),
]  # fmt: skip


@pytest.mark.parametrize(("text", "message"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_file_names_the_key_and_the_problem(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(SpaceError) as err:
        load_space(path)
    assert isinstance(err.value, ValueError)
    assert str(err.value).startswith("bad.yaml: ")
    assert message in str(err.value)
    assert "\n" not in str(err.value) and str(tmp_path) not in str(err.value)


def test_missing_file_unknown_name_and_wrong_suffix(tmp_path: Path) -> None:
    with pytest.raises(SpaceError, match=r"^nope\.yaml: cannot read .*nope\.yaml"):
        load_space(str(tmp_path / "nope.yaml"))
    with pytest.raises(
        SpaceError, match=r"^nope: unknown search space; built-in spaces: ablation, default, smoke"
    ):
        load_space("nope")
    with pytest.raises(KeyError):  # an unknown name is still a failed lookup for older callers
        build_param_space("nope")
    (tmp_path / "space.json").write_text("{}")
    with pytest.raises(SpaceError, match=r"^space\.json: a space file ends in \.yaml or \.yml"):
        load_space(tmp_path / "space.json")


def test_numbers_in_exponent_notation_are_numbers(tmp_path: Path) -> None:
    """PyYAML reads 1e-5 as text (YAML 1.1); a space file reads it as the number everyone means."""
    path = tmp_path / "sci.yml"
    path.write_text(P + "  optim.lr_ecg: {type: loguniform, low: 1e-5, high: 1E-3}\n")
    assert load_space(path).data["params"]["optim.lr_ecg"] == {
        "type": "loguniform",
        "low": 1e-5,
        "high": 1e-3,
    }


# ---------------------------------------------------------------------------------------------------
# a valid user file builds the same Tune space as the equivalent dict

USER_SEARCH = """\
# a user's space: every distribution type
kind: search
description: every distribution type
params:
  loss.w_sten: {type: uniform, low: 0.1, high: 0.9}
  optim.lr_ecg: {type: loguniform, low: 1.0e-5, high: 1.0e-3}
  train.knn_k: {type: int, low: 3, high: 9}
  model.contract: {type: categorical, values: [paper, native]}
points_to_evaluate:
  - {loss.w_sten: 0.3, train.knn_k: 5}
"""
USER_SEARCH_DICT = {
    "kind": "search",
    "description": "every distribution type",
    "params": {
        "loss.w_sten": {"type": "uniform", "low": 0.1, "high": 0.9},
        "optim.lr_ecg": {"type": "loguniform", "low": 1e-5, "high": 1e-3},
        "train.knn_k": {"type": "int", "low": 3, "high": 9},
        "model.contract": {"type": "categorical", "values": ["paper", "native"]},
    },
    "points_to_evaluate": [{"loss.w_sten": 0.3, "train.knn_k": 5}],
}
USER_VARIANTS = """\
kind: variants
variants:
  - {loss.w_sten: 0.0}
  - {loss.w_sten: 0.3, optim.epochs: 20, data.leads: [I, II, V1]}
"""
USER_VARIANTS_DICT = {
    "kind": "variants",
    "variants": [
        {"loss.w_sten": 0.0},
        {"loss.w_sten": 0.3, "optim.epochs": 20, "data.leads": ["I", "II", "V1"]},
    ],
}


def _describe(value: Any) -> Any:
    """A Tune domain as comparable data (domains have no equality of their own)."""
    from ray import tune

    if not isinstance(value, tune.search.sample.Domain):
        return value
    return (type(value).__name__, type(value.get_sampler()).__name__, getattr(value, "lower", None),
            getattr(value, "upper", None), getattr(value, "categories", None))  # fmt: skip


@pytest.mark.parametrize(
    ("text", "data"),
    [(USER_SEARCH, USER_SEARCH_DICT), (USER_VARIANTS, USER_VARIANTS_DICT)],
    ids=["search", "variants"],
)
def test_user_file_builds_like_the_equivalent_dict(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, text: str, data: dict
) -> None:
    path = tmp_path / "mine.yaml"
    path.write_text(text)
    monkeypatch.setitem(SPACES, "mine", data)
    base = Config()
    from_file, from_dict = build_param_space(path, base), build_param_space("mine", base)
    assert from_file[1] == from_dict[1]
    assert {k: _describe(v) for k, v in from_file[0].items()} == {
        k: _describe(v) for k, v in from_dict[0].items()
    }
    space = load_space(str(path))
    assert isinstance(space, SearchSpace) and space.name == "mine.yaml" and space.stem == "mine"
    assert space.text == text and space.data == data and is_fixed(path) == (data["kind"] == "variants")


def test_user_search_space_domains_and_points(tmp_path: Path) -> None:
    path = tmp_path / "mine.yaml"
    path.write_text(USER_SEARCH)
    space, points = build_param_space(path)
    assert _describe(space["loss.w_sten"]) == ("Float", "_Uniform", 0.1, 0.9, None)
    assert _describe(space["optim.lr_ecg"]) == ("Float", "_LogUniform", 1e-5, 1e-3, None)
    assert _describe(space["train.knn_k"]) == ("Integer", "_Uniform", 3, 10, None)  # high is inclusive
    assert {space["train.knn_k"].sample() for _ in range(300)} == set(range(3, 10))
    assert _describe(space["model.contract"]) == ("Categorical", "_Uniform", None, None, ["paper", "native"])
    defaults = Config()
    assert points == [{"loss.w_sten": 0.3, "optim.lr_ecg": defaults.optim.lr_ecg, "train.knn_k": 5,
                       "model.contract": defaults.model.contract}]  # fmt: skip


def test_user_variants_are_completed_from_the_config(tmp_path: Path) -> None:
    path = tmp_path / "mine.yaml"
    path.write_text(USER_VARIANTS)
    space, variants = build_param_space(path)
    assert set(space) == {"loss.w_sten", "optim.epochs", "data.leads"}
    assert variants == [
        {"data.leads": list(Config().data.leads), "loss.w_sten": 0.0, "optim.epochs": Config().optim.epochs},
        {"data.leads": ["I", "II", "V1"], "loss.w_sten": 0.3, "optim.epochs": 20},
    ]


def test_registered_dict_spaces_are_validated_too(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(SPACES, "bad", {"kind": "search", "params": {"loss.w_sten": {"type": "choice"}}})
    with pytest.raises(
        SpaceError, match=r"^space 'bad': params: loss.w_sten: unknown distribution type 'choice'"
    ):
        build_param_space("bad")
    monkeypatch.setitem(SPACES, "toy", {"kind": "variants", "variants": [{"loss.w_sten": 0.5}]})
    assert yaml.safe_load(load_space("toy").text) == SPACES["toy"]  # what the sweep's run then keeps


# ---------------------------------------------------------------------------------------------------
# `stence tune --space FILE`


def test_tune_refuses_a_bad_file_before_anything_starts(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    import ray

    monkeypatch.chdir(tmp_path)
    bad = tmp_path / "bad.yaml"
    bad.write_text(P + "  loss.w_stn: {type: uniform, low: 0.0, high: 1.0}\n")
    sets = ["--set", f"train.storage_path={tmp_path / 'ray'}", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
            f"data.cohort={tmp_path / 'cohort'}"]  # fmt: skip
    was_up = ray.is_initialized()
    assert main(["tune", "--space", str(bad), *sets]) == 2
    assert main(["tune", "--space", "nope", *sets]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err == [
        "stence tune: bad.yaml: params: unknown config key 'loss.w_stn'; close matches: loss.w_sten",
        "stence tune: nope: unknown search space; built-in spaces: ablation, default, smoke, or give a .yaml/.yml "
        "file",
    ]
    assert ray.is_initialized() == was_up  # no Ray session started (the shared one, if any, was up before)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.yaml"]  # no MLflow store, no sweep folder


# ---------------------------------------------------------------------------------------------------
# the sweep's parent run keeps the space


def test_parent_run_keeps_the_space_text_and_its_file_name(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    import mlflow

    from stence.config import load_config
    from stence.tracking.runs import Tracker
    from stence.tracking.spool import SPOOL_NAME
    from stence.tune.sweep import SPACE_FILE, _new_sweep

    db = shared_mlflow_db(tmp_path_factory)
    user = tmp_path / "somebody" / "my_space.yaml"
    user.parent.mkdir()
    user.write_text(USER_SEARCH)
    cfg = load_config(None, [f"train.storage_path={tmp_path / 'ray'}", f"tracking.uri={db}",
                             "tracking.experiment=space-yaml"])  # fmt: skip
    path, base, state = _new_sweep(cfg, load_space(user), 4, "asha", "m", "max", 0, None)
    Tracker(base.tracking.uri, state["parent_run_id"], spool=path / SPOOL_NAME).end("KILLED")
    run = mlflow.MlflowClient(db).get_run(state["parent_run_id"])
    assert (
        run.data.tags["stence.space"] == "my_space.yaml" and run.data.params["sweep.space"] == "my_space.yaml"
    )
    assert path.name.startswith("stence-sweep-my_space-")
    assert not [v for v in {**run.data.tags, **run.data.params}.values() if "somebody" in v]
    local = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path=SPACE_FILE,
                                                dst_path=str(tmp_path / "dl"), tracking_uri=db)  # fmt: skip
    assert Path(local).read_text() == USER_SEARCH  # the file as written, comments included
