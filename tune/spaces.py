"""Named search spaces over dotted config keys, kept as plain data.

A space is either a search ("params": distributions, searched by Optuna TPE, "points_to_evaluate"
tried first) or a fixed list of "variants" (the ablation: every variant runs once, nothing sampled).
Points and variants may be partial; `build_param_space` fills the missing keys from the sweep's own
resolved config (the embedded defaults when none is given), so every trial states every swept value and a
point such as the paper's runs at the learning rates the user configured.
"""

from __future__ import annotations

from typing import Any

from stence.config import Config, apply_overrides, flatten, to_dict

SPACES: dict[str, dict[str, Any]] = {
    "default": {
        "kind": "search",
        "params": {
            "loss.w_sten": {"type": "uniform", "low": 0.0, "high": 1.0},
            "loss.temperature": {"type": "loguniform", "low": 0.02, "high": 0.5},
            "optim.lr_ecg": {"type": "loguniform", "low": 1e-5, "high": 1e-3},
            "optim.lr_angio": {"type": "loguniform", "low": 1e-5, "high": 1e-3},
        },
        # the paper's setting first: W_Sten 0.3, tau 0.2 (learning rates from the config defaults)
        "points_to_evaluate": [{"loss.w_sten": 0.3, "loss.temperature": 0.2}],
    },
    "ablation": {
        "kind": "variants",
        # every variant feeds the ECG encoder the paper's input contract, except the last, which feeds the
        # backbone its upstream (native) contract: which serves StenCE better is an open question
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


def _distribution(key: str, spec: dict[str, Any]) -> Any:
    from ray import tune

    kind = spec.get("type")
    if kind == "uniform":
        return tune.uniform(spec["low"], spec["high"])
    if kind == "loguniform":
        return tune.loguniform(spec["low"], spec["high"])
    if kind == "quniform":
        return tune.quniform(spec["low"], spec["high"], spec["q"])
    if kind == "randint":
        return tune.randint(spec["low"], spec["high"])
    if kind == "choice":
        return tune.choice(list(spec["values"]))
    raise ValueError(
        f"{key}: unknown distribution type {kind!r} (uniform, loguniform, quniform, randint, choice)"
    )


def get_space(name: str) -> dict[str, Any]:
    """The raw space data; an unknown name fails with the valid ones."""
    if name not in SPACES:
        raise KeyError(f"unknown search space {name!r}; valid spaces: {', '.join(sorted(SPACES))}")
    return SPACES[name]


def is_fixed(name: str) -> bool:
    """True for a fixed variant list (run each once, no sampler)."""
    return get_space(name).get("kind") == "variants"


def _complete(points: list[dict[str, Any]], keys: list[str], base: Config,
              defaults: dict[str, Any]) -> list[dict[str, Any]]:
    """Fill every point to `keys` from `defaults` (`base` flattened); reject keys the config does not have."""
    out = []
    for point in points:
        apply_overrides(base, point)  # raises ConfigError (with the valid keys) on a bad key or value
        out.append({k: point.get(k, defaults[k]) for k in keys})
    return out


def build_param_space(name: str, base: Config | None = None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(Tune param_space keyed by dotted config keys, points_to_evaluate).

    For a search space the param_space holds `ray.tune` distributions. For a variant list it holds the
    config defaults as constants and the variants come back as points_to_evaluate, to be run with
    num_samples = len(variants) so nothing beyond them is ever sampled. Missing keys come from `base` (the
    sweep's resolved config; the embedded defaults when None).
    """
    base = base if base is not None else Config()
    defaults = flatten(to_dict(base))
    space = get_space(name)
    if space.get("kind") == "variants":
        variants = space["variants"]
        keys = sorted({k for v in variants for k in v})
        points = _complete(variants, keys, base, defaults)
        return {k: defaults[k] for k in keys}, points
    params = space["params"]
    keys = list(params)
    points = _complete(space.get("points_to_evaluate", []), keys, base, defaults)
    extra = {k for p in space.get("points_to_evaluate", []) for k in p} - set(keys)
    if extra:
        raise ValueError(
            f"space {name!r}: points_to_evaluate set keys that are not searched: {sorted(extra)}"
        )
    return {k: _distribution(k, spec) for k, spec in params.items()}, points


__all__ = ["SPACES", "build_param_space", "get_space", "is_fixed"]
