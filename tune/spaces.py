"""Search spaces over dotted config keys, kept as YAML data files.

A space is either a search (`kind: search`: `params` maps dotted config keys to distributions, searched by
Optuna; `points_to_evaluate` are tried first) or a fixed list of variants (`kind: variants`: the
ablation; every variant runs once, nothing is sampled). The built-in spaces are the files in
`tune/space_files/` (shipped as package data); `stence tune --space FILE.yaml` takes a user's file of the
same schema:

    kind: search                      # or: variants
    description: free text            # optional
    params:                           # search only
      loss.w_sten: {type: uniform, low: 0.0, high: 1.0}
      optim.lr_ecg: {type: loguniform, low: 1.0e-5, high: 1.0e-3}   # 0 < low < high
      train.knn_k: {type: int, low: 3, high: 9}                     # inclusive integers
      model.contract: {type: categorical, values: [paper, native]}
    points_to_evaluate:               # search only, optional: partial points over the searched keys
      - {loss.w_sten: 0.3}
    variants:                         # variants only: partial configs, each run once
      - {loss.w_sten: 0.0}

Every key must be a config key, and every value (bounds, categories, points, variants) must fit the type
of its config field. A space that breaks any rule raises `SpaceError`, whose message starts with the file
name and names the bad key. Points and variants may be partial; `build_param_space` fills the missing keys
from the sweep's own resolved config (the embedded defaults when none is given), so every trial states
every swept value and a point such as the paper's runs at the learning rates the user configured.
"""

from __future__ import annotations

import copy
import difflib
import os
import re
import typing
from collections.abc import Hashable
from dataclasses import dataclass, fields, is_dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from stence.config import Config, ConfigError, apply_overrides, flatten, to_dict

SPACE_FILES = "space_files"  # package data folder of tune/ holding the built-in spaces
SUFFIXES = (".yaml", ".yml")
DISTRIBUTIONS = ("categorical", "int", "loguniform", "uniform")
TOP_KEYS = {"search": ("kind", "description", "params", "points_to_evaluate"),
            "variants": ("kind", "description", "variants")}  # fmt: skip


class SpaceError(ConfigError):
    """A search space that cannot be used; the message starts with its file (or space) name."""


class UnknownSpaceError(SpaceError, KeyError):
    """Neither a built-in space nor a YAML file (a KeyError too: an unknown name is a failed lookup)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


@dataclass(frozen=True)
class SearchSpace:
    name: str  # the built-in name or the file's name, never its folder (it is logged to MLflow)
    data: dict[str, Any]  # the validated space: kind, params / points_to_evaluate, or variants
    text: str  # the YAML text as written (comments included), logged to the sweep's run as space.yaml

    @property
    def fixed(self) -> bool:
        """A variant list: every variant runs once, with no sampler and no early stopping."""
        return self.data["kind"] == "variants"

    @property
    def stem(self) -> str:
        """The name without its suffix, for sweep names."""
        return Path(self.name).stem if self.name.endswith(SUFFIXES) else self.name


# ---------------------------------------------------------------------------------------------------
# YAML: 1e-5 is a number (PyYAML's YAML 1.1 reads it as text) and a repeated key is an error


class _Loader(yaml.SafeLoader):
    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, Hashable):
                continue  # SafeLoader reports it
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}",
                                                        key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+|\.[0-9_]+[eE][-+]?[0-9]+)$"),
    list("-+0123456789."),
)


def _parse(text: str, source: str) -> Any:
    try:
        return yaml.load(text, Loader=_Loader)  # a SafeLoader: no arbitrary objects
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = str(getattr(e, "problem", None) or e).replace("\n", " ")
        raise SpaceError(f"{source}: not valid YAML{where}: {problem}") from None


# ---------------------------------------------------------------------------------------------------
# validation against the config's own fields


def _config_types(cls: type = Config, prefix: str = "") -> dict[str, Any]:
    """Dotted config key -> the type of its field."""
    out: dict[str, Any] = {}
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        tp = hints[f.name]
        if is_dataclass(tp):
            out.update(_config_types(tp, f"{prefix}{f.name}."))
        else:
            out[prefix + f.name] = tp
    return out


CONFIG_TYPES = _config_types()


def _unknown_key(key: Any, where: str) -> str:
    key = str(key)
    close = difflib.get_close_matches(key, CONFIG_TYPES, n=3, cutoff=0.6)
    close += [k for k in CONFIG_TYPES if k.rsplit(".", 1)[-1] == key.rsplit(".", 1)[-1] and k not in close]
    hint = f"close matches: {', '.join(close)}" if close else "config keys are dotted, e.g. optim.lr_ecg"
    return f"{where}: unknown config key {key!r}; {hint}"


_EXPECTED = {float: ("a number", (int, float)), int: ("an integer", int), bool: ("a boolean", bool),
             str: ("a string", str)}  # fmt: skip


def _type_problem(value: Any, tp: Any) -> str | None:
    """What is wrong with `value` for a field of type `tp` (strictly: YAML gives typed scalars), or None."""
    if typing.get_origin(tp) is tuple:
        if not isinstance(value, list):
            return f"expected a list, got {type(value).__name__} {value!r}"
        item_types = [a for a in typing.get_args(tp) if a is not Ellipsis]
        for item in value if item_types else []:
            if problem := _type_problem(item, item_types[0]):
                return f"item {item!r}: {problem}"
        return None
    if tp not in _EXPECTED:
        return None
    what, ok = _EXPECTED[tp]
    if not isinstance(value, ok) or (isinstance(value, bool) and tp is not bool):  # True is an int in Python
        return f"expected {what} ({tp.__name__}), got {type(value).__name__} {value!r}"
    return None


def _check_values(point: Any, where: str) -> None:
    """A point or variant: a mapping of config keys to values of their fields' types."""
    if not isinstance(point, dict):
        raise SpaceError(f"{where}: expected a mapping of config keys to values, got {point!r}")
    for key, value in point.items():
        if key not in CONFIG_TYPES:
            raise SpaceError(_unknown_key(key, where))
        if problem := _type_problem(value, CONFIG_TYPES[key]):
            raise SpaceError(f"{where}: {key}: {problem}")


def _check_distribution(key: str, spec: Any, where: str) -> None:
    at = f"{where}: {key}"
    if not isinstance(spec, dict) or "type" not in spec:
        raise SpaceError(f"{at}: expected a mapping with a type ({', '.join(DISTRIBUTIONS)}), got {spec!r}")
    kind, tp = spec["type"], CONFIG_TYPES[key]
    if kind not in DISTRIBUTIONS:
        raise SpaceError(f"{at}: unknown distribution type {kind!r}; valid types: {', '.join(DISTRIBUTIONS)}")
    allowed = {"type", "values"} if kind == "categorical" else {"type", "low", "high"}
    if extra := sorted(set(spec) - allowed):
        raise SpaceError(f"{at}: unknown field(s) {', '.join(map(str, extra))} for type {kind}; "
                         f"valid: {', '.join(sorted(allowed))}")  # fmt: skip
    if kind == "categorical":
        values = spec.get("values")
        if not isinstance(values, list) or not values:
            raise SpaceError(f"{at}: categorical needs a non-empty list of values")
        if typing.get_origin(tp) is tuple:
            raise SpaceError(f"{at}: a list field cannot be a category (Optuna takes scalars); use variants")
        for v in values:
            if problem := _type_problem(v, tp):
                raise SpaceError(f"{at}: value {v!r}: {problem}")
        return
    if tp not in ((int, float) if kind == "int" else (float,)):
        field = _EXPECTED[tp][0] if tp in _EXPECTED else "a list"
        other = "int" if tp is int else "categorical"
        raise SpaceError(f"{at}: {kind} does not fit a config field holding {field}; use type {other}")
    for bound in ("low", "high"):
        if bound not in spec:
            raise SpaceError(f"{at}: {kind} needs low and high; {bound} is missing")
        if problem := _type_problem(spec[bound], int if kind == "int" else float):
            raise SpaceError(f"{at}: {bound}: {problem}")
    if spec["low"] >= spec["high"]:
        raise SpaceError(f"{at}: low ({spec['low']}) must be below high ({spec['high']})")
    if kind == "loguniform" and spec["low"] <= 0:
        raise SpaceError(f"{at}: loguniform needs 0 < low, got low {spec['low']}")


def _out_of_range(spec: dict[str, Any], value: Any) -> str | None:
    """Why a point's value is outside its distribution, or None."""
    if spec["type"] == "categorical":
        return None if value in spec["values"] else f"is not one of the values {spec['values']}"
    if spec["type"] == "int" and not isinstance(value, int):
        return "is not an integer (type int)"
    if not spec["low"] <= value <= spec["high"]:
        return f"is outside [{spec['low']}, {spec['high']}]"
    return None


def _check_search(data: dict[str, Any], source: str) -> None:
    params = data.get("params")
    if not isinstance(params, dict) or not params:
        raise SpaceError(f"{source}: params: empty; a search space needs at least one parameter")
    for key, spec in params.items():
        if key not in CONFIG_TYPES:
            raise SpaceError(_unknown_key(key, f"{source}: params"))
        _check_distribution(key, spec, f"{source}: params")
    points = data.get("points_to_evaluate", [])
    if not isinstance(points, list):
        raise SpaceError(f"{source}: points_to_evaluate: expected a list of points, got {points!r}")
    for i, point in enumerate(points):
        where = f"{source}: points_to_evaluate[{i}]"
        _check_values(point, where)
        for key, value in point.items():
            if key not in params:
                raise SpaceError(f"{where}: {key} is not searched (params: {', '.join(params)})")
            if problem := _out_of_range(params[key], value):
                raise SpaceError(f"{where}: {key}: {value!r} {problem}")


def validate_space(data: Any, source: str) -> dict[str, Any]:
    """`data` if it is a valid space; else a `SpaceError` starting with `source` and naming the bad key."""
    if not isinstance(data, dict) or not data:
        got = "an empty document" if not data else type(data).__name__
        raise SpaceError(f"{source}: expected a mapping with kind: search or kind: variants, got {got}")
    kind = data.get("kind")
    if kind not in TOP_KEYS:
        got = "missing" if kind is None else f"got {kind!r}"
        raise SpaceError(f"{source}: kind: {got}; expected search or variants")
    if extra := [str(k) for k in data if k not in TOP_KEYS[kind]]:
        close = {m for k in extra for m in difflib.get_close_matches(k, TOP_KEYS[kind], n=1)}
        hint = f" (did you mean {', '.join(sorted(close))}?)" if close else ""
        raise SpaceError(f"{source}: unknown top-level key(s) {', '.join(extra)} for kind {kind}{hint}; "
                         f"valid: {', '.join(TOP_KEYS[kind])}")  # fmt: skip
    if not isinstance(data.get("description", ""), str):
        raise SpaceError(f"{source}: description: expected text, got {data['description']!r}")
    if kind == "search":
        _check_search(data, source)
        return data
    variants = data.get("variants")
    if not isinstance(variants, list) or not variants:
        raise SpaceError(f"{source}: variants: empty; a variant space needs a non-empty list of variants")
    for i, variant in enumerate(variants):
        _check_values(variant, f"{source}: variants[{i}]")
    return data


# ---------------------------------------------------------------------------------------------------
# the built-in spaces and user files


def _builtin_texts() -> dict[str, str]:
    folder = resources.files(__package__) / SPACE_FILES
    return {f.name.rsplit(".", 1)[0]: f.read_text(encoding="utf-8")
            for f in folder.iterdir() if f.name.endswith(".yaml")}  # fmt: skip


_BUILTIN_TEXT = _builtin_texts()
_BUILTIN = {name: validate_space(_parse(text, f"{name}.yaml"), f"{name}.yaml")
            for name, text in _BUILTIN_TEXT.items()}  # fmt: skip
# name -> space data: the built-in files, plus any space code registers for its process (tests, benches);
# copies, so that changing an entry never changes what the built-in file is known to hold
SPACES: dict[str, dict[str, Any]] = copy.deepcopy(dict(sorted(_BUILTIN.items())))


def space_name(space: str | os.PathLike | SearchSpace) -> str:
    """The name a space is known by in sweeps and MLflow (a built-in name or a file name), unloaded."""
    if isinstance(space, SearchSpace):
        return space.name
    return Path(space).name if _is_file(space) else str(space)


def _is_file(space: str | os.PathLike) -> bool:
    return isinstance(space, os.PathLike) or str(space).lower().endswith(SUFFIXES)


def load_space_file(path: str | os.PathLike) -> SearchSpace:
    """A user's space file, validated; errors start with the file's name."""
    path = Path(path)
    if not path.name.lower().endswith(SUFFIXES):
        raise SpaceError(f"{path.name}: a space file ends in .yaml or .yml")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise SpaceError(f"{path.name}: cannot read {path}: {getattr(e, 'strerror', None) or e}") from None
    return SearchSpace(path.name, validate_space(_parse(text, path.name), path.name), text)


def load_space(space: str | os.PathLike | SearchSpace) -> SearchSpace:
    """A built-in (or registered) space by name, or a `.yaml`/`.yml` file; validated."""
    if isinstance(space, SearchSpace):
        return space
    if _is_file(space):
        return load_space_file(space)
    name = str(space)
    data = get_space(name)
    if data == _BUILTIN.get(name):  # the file as written, comments included
        return SearchSpace(name, data, _BUILTIN_TEXT[name])
    # a space registered in code (or a built-in changed in place): validated, logged as its YAML dump
    return SearchSpace(name, validate_space(data, f"space {name!r}"), yaml.safe_dump(data, sort_keys=False))


def get_space(name: str) -> dict[str, Any]:
    """The raw data of a named space; an unknown name fails with the valid ones."""
    if name not in SPACES:
        valid = ", ".join(sorted(SPACES))
        raise UnknownSpaceError(f"{name}: unknown search space; built-in spaces: {valid}, "
                                "or give a .yaml/.yml file")
    return SPACES[name]


def is_fixed(space: str | os.PathLike | SearchSpace) -> bool:
    """True for a fixed variant list (run each once, no sampler)."""
    return load_space(space).fixed


def _distribution(spec: dict[str, Any]) -> Any:
    # Ray is imported here, not at the top: `stence tune` checks a space file before anything heavy loads
    from ray import tune

    kind = spec["type"]
    if kind == "uniform":
        return tune.uniform(spec["low"], spec["high"])
    if kind == "loguniform":
        return tune.loguniform(spec["low"], spec["high"])
    if kind == "int":
        return tune.randint(spec["low"], spec["high"] + 1)  # randint excludes its upper bound
    return tune.choice(list(spec["values"]))


def _complete(points: list[dict[str, Any]], keys: list[str], base: Config,
              defaults: dict[str, Any]) -> list[dict[str, Any]]:
    """Fill every point to `keys` from `defaults` (`base` flattened); reject keys the config does not have."""
    out = []
    for point in points:
        apply_overrides(base, point)  # raises ConfigError (with the valid keys) on a bad key or value
        out.append({k: point.get(k, defaults[k]) for k in keys})
    return out


def build_param_space(space: str | os.PathLike | SearchSpace,
                      base: Config | None = None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(Tune param_space keyed by dotted config keys, points_to_evaluate) of a space name, file or object.

    For a search space the param_space holds `ray.tune` distributions. For a variant list it holds the
    config defaults as constants and the variants come back as points_to_evaluate, to be run with
    num_samples = len(variants) so nothing beyond them is ever sampled. Missing keys come from `base` (the
    sweep's resolved config; the embedded defaults when None).
    """
    base = base if base is not None else Config()
    defaults = flatten(to_dict(base))
    data = load_space(space).data
    if data["kind"] == "variants":
        variants = data["variants"]
        keys = sorted({k for v in variants for k in v})
        return {k: defaults[k] for k in keys}, _complete(variants, keys, base, defaults)
    params = data["params"]
    points = _complete(data.get("points_to_evaluate") or [], list(params), base, defaults)
    return {k: _distribution(spec) for k, spec in params.items()}, points


__all__ = ["DISTRIBUTIONS", "SPACES", "SearchSpace", "SpaceError", "build_param_space", "get_space",
           "is_fixed", "load_space", "load_space_file", "space_name", "validate_space"]
