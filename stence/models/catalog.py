"""The model catalog: one name -> builder table per model family, and `create_*` to build by name.

The bottom of stence.models: model files register their builders here with the decorators below, and the
loaders that rebuild an encoder from a checkpoint's architecture name look them up here. Wiring models from a
`Config` (`build_*`) is one level up, in stence/models/registry.py.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from torch import nn

if TYPE_CHECKING:
    from stence.models.base import ECGEncoder
    from stence.models.frame_encoder import FrameEncoder

# the built-in model files register themselves when imported; they import this module, so it cannot import
# them at its top: `_load_builtin` imports them by name on the first lookup
_BUILTIN_MODULES = ("stence.models.otis", "stence.models.echoingecg", "stence.models.frame_encoder")
_ECG_ENCODERS: dict[str, Callable[..., nn.Module]] = {}
_FRAME_ENCODERS: dict[str, Callable[..., nn.Module]] = {}


def _load_builtin() -> None:
    for mod in _BUILTIN_MODULES:
        importlib.import_module(mod)


def _register(table: dict[str, Callable[..., nn.Module]], family: str, name: str):
    def deco(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in table and table[name] is not fn:
            raise ValueError(f"{family} {name!r} is already registered")
        table[name] = fn
        return fn

    return deco


def _plain(v: Any) -> Any:
    """Overrides are stored in checkpoints loaded with weights_only=True: keep them plain."""
    return list(v) if isinstance(v, tuple) else v


def _create(table: dict[str, Callable[..., nn.Module]], family: str, name: str, overrides: dict) -> nn.Module:
    _load_builtin()
    if name not in table:
        raise ValueError(f"unknown {family} {name!r}; valid: {sorted(table)}")
    overrides = dict(overrides)
    contract = overrides.pop("contract", None) if table is _ECG_ENCODERS else None
    model = table[name](**overrides)
    model.arch = {"name": name, "overrides": {k: _plain(v) for k, v in overrides.items()}}
    if contract is not None:  # rebuilt from a checkpoint's architecture: its input contract comes back
        model.set_contract(contract)
    return model


def register_ecg_encoder(name: str):
    """Decorator: register a builder `fn(**overrides) -> ECGEncoder` under `name`."""
    return _register(_ECG_ENCODERS, "ECG encoder", name)


def create_ecg_encoder(name: str, **overrides: Any) -> ECGEncoder:
    """Build a registered ECG encoder; unknown names raise ValueError with the valid list."""
    return _create(_ECG_ENCODERS, "ECG encoder", name, overrides)  # type: ignore[return-value]


def list_ecg_encoders() -> list[str]:
    _load_builtin()
    return sorted(_ECG_ENCODERS)


def register_frame_encoder(name: str):
    """Decorator: register a builder `fn(**overrides) -> FrameEncoder` under `name`."""
    return _register(_FRAME_ENCODERS, "frame encoder", name)


def create_frame_encoder(name: str, **overrides: Any) -> FrameEncoder:
    """Build a registered angiography frame encoder; unknown names raise ValueError with the valid list."""
    return _create(_FRAME_ENCODERS, "frame encoder", name, overrides)  # type: ignore[return-value]


def list_frame_encoders() -> list[str]:
    _load_builtin()
    return sorted(_FRAME_ENCODERS)


__all__ = [
    "create_ecg_encoder",
    "create_frame_encoder",
    "list_ecg_encoders",
    "list_frame_encoders",
    "register_ecg_encoder",
    "register_frame_encoder",
]
