"""Reading user-supplied model files (checkpoints, the EchoingECG scaler) without running code from them.

A `.pth`/`.pt` file is a pickle, and a pickle may name any importable callable (`os.system`, `eval`) to be
called while it loads. Every checkpoint here goes through `safe_torch_load`: torch's weights-only unpickler,
which builds tensors and plain containers and refuses any other global before calling anything, with the
one extra class public checkpoints hold allowed (see `SAFE_GLOBALS`).

The EchoingECG scaler is published as a pickled scikit-learn `StandardScaler` (`ecg_scaler.pkl`, read
upstream with `joblib.load`). `read_scaler_pickle` reads its fitted arrays with an allow-listing unpickler
that never imports scikit-learn nor joblib; `stence scaler convert` writes them as JSON, the only scaler
format the platform loads (`load_scaler`, JSON or npz).
"""

from __future__ import annotations

import _compat_pickle
import argparse
import bz2
import codecs
import gzip
import io
import json
import lzma
import math
import pickle
import pickletools
import re
import zipfile
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

try:  # numpy >= 2
    from numpy._core import multiarray as _np_multiarray
    from numpy._core import numeric as _np_numeric
except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core import multiarray as _np_multiarray  # type: ignore[no-redef]
    from numpy.core import numeric as _np_numeric  # type: ignore[no-redef]


class CheckpointError(ValueError):
    """A model file that cannot be used: refused content, unreadable, or not matching the input contract."""


class ContractWarning(UserWarning):
    """A checkpoint is used outside what it was trained on, in a way its upstream code allows."""


# Classes public checkpoints hold besides tensors and plain containers (torch allows those itself, and
# torch.Size, which OTIS `domains` holds). argparse.Namespace: OTIS's `args`, the pretraining run's
# options; loading one builds an empty Namespace and sets attributes on it, it calls nothing. The golden
# OTIS-base file loads with exactly this list (tests/test_safe_loading.py); EchoingECG and DINOv2 files
# are bare state dicts and need nothing.
SAFE_GLOBALS: list[Any] = [argparse.Namespace]

_TRUSTED_MODULES = ("torch", "collections", "argparse")  # what torch's weights-only load accepts here


def safe_torch_load(path: str | Path, what: str) -> Any:
    """`torch.load(path, map_location="cpu", weights_only=True)` with `SAFE_GLOBALS` allowed.

    `what` names the file's purpose in errors ("OTIS checkpoint"). A pickle that
    references anything else raises a one-line CheckpointError naming the refused global; nothing from the
    file has run by then. A missing file raises FileNotFoundError as usual.
    """
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except OSError:
        raise
    except Exception as e:  # UnpicklingError / RuntimeError / KeyError from a refused or corrupt pickle
        refused = _refused_globals(path, str(e))
        if refused:
            raise CheckpointError(
                f"{what} {path}: refused: the pickle references {', '.join(refused)}, which a weights-only "
                "load does not allow, so nothing in the file was executed; if you trust its source, re-save "
                "only its tensors and plain data (torch.save(state_dict)) and load that"
            ) from None
        first = next((s.strip() for s in str(e).splitlines() if s.strip()), "")
        raise CheckpointError(
            f"{what} {path}: not a readable weights-only torch file ({type(e).__name__}: {first})"
        ) from e


def _refused_globals(path: str | Path, message: str) -> list[str]:
    """Globals named by the file's pickle(s) that a weights-only load refuses (read statically, never run)."""
    found = _pickle_globals(_pickle_bytes(path))
    named = re.search(r"GLOBAL ([\w.]+)", message)
    if named:  # torch names the first refused one; give it its module when torch left it out ("eval")
        name = named.group(1)
        full = [g.replace("__builtin__.", "builtins.") for g in found if g == name or g.endswith("." + name)]
        return full[:1] or [name]
    return [g for g in dict.fromkeys(found) if g.split(".")[0] not in _TRUSTED_MODULES][:5]


def _pickle_bytes(path: str | Path, limit: int = 1 << 26) -> bytes:
    """The pickle stream of a torch file: `*/data.pkl` of the zip format, else the file's first bytes."""
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as zf:
                name = next((n for n in zf.namelist() if n.endswith("data.pkl")), None)
                return zf.open(name).read(limit) if name else b""
        with open(path, "rb") as f:
            return f.read(limit)
    except (OSError, zipfile.BadZipFile):
        return b""


def _pickle_globals(blob: bytes, max_pickles: int = 4) -> list[str]:
    """Every global ("module.name") the first pickles of `blob` reference, read with pickletools (nothing runs)."""
    out: list[str] = []
    f = io.BytesIO(blob)
    for _ in range(max_pickles):  # a legacy torch file is several pickles in a row
        strings: list[str] = []
        memo: dict[int, Any] = {}
        last: Any = None
        try:
            for op, arg, _pos in pickletools.genops(f):
                if op.name in ("GLOBAL", "INST"):
                    out.append(str(arg).replace(" ", "."))
                elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                    out.append(f"{strings[-2]}.{strings[-1]}")
                if op.name == "MEMOIZE":
                    memo[len(memo)] = last
                elif op.name in ("PUT", "BINPUT", "LONG_BINPUT"):
                    memo[int(arg)] = last
                else:
                    last = memo.get(int(arg)) if op.name in ("GET", "BINGET", "LONG_BINGET") else arg
                    if isinstance(last, str) and op.name not in ("GLOBAL", "INST"):
                        strings.append(last)
        except Exception:  # end of data or not a pickle: the names found so far are all there is
            break
    return out


# ---------------------------------------------------------------------------------------------------
# the EchoingECG scaler


class _ScalerState:
    """Stand-in for sklearn's StandardScaler: keeps the pickled attribute dict, runs no scikit-learn code."""

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, dict):
            raise pickle.UnpicklingError("StandardScaler state is not a dict")
        self.state = state


class _ArrayWrapper:
    """Stand-in for joblib's NumpyArrayWrapper: the array's raw bytes follow it in the file."""

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, dict):
            raise pickle.UnpicklingError("joblib array wrapper state is not a dict")
        self.state = state


# Everything a pickled (or joblib-dumped) StandardScaler references, and what it resolves to. Nothing is
# imported by name from the file: the table maps the names to these objects, every other name is refused.
_SCALER_GLOBALS: dict[tuple[str, str], Any] = {
    # the scaler itself, as scikit-learn >= 0.22 and older releases spell it: a stand-in, never sklearn
    ("sklearn.preprocessing._data", "StandardScaler"): _ScalerState,
    ("sklearn.preprocessing.data", "StandardScaler"): _ScalerState,
    # joblib.dump writes each array as a wrapper followed by its bytes: a stand-in that reads them
    ("joblib.numpy_pickle", "NumpyArrayWrapper"): _ArrayWrapper,
    ("sklearn.externals.joblib.numpy_pickle", "NumpyArrayWrapper"): _ArrayWrapper,
    # numpy arrays (mean_, scale_, var_), their dtypes and numpy scalars (n_samples_seen_): numpy 2 and 1
    # module paths; pickle protocol 5 rebuilds arrays with _frombuffer instead of _reconstruct
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    **{
        (mod, name): getattr(_np_multiarray, name)
        for mod in ("numpy._core.multiarray", "numpy.core.multiarray")
        for name in ("_reconstruct", "scalar")
    },
    **{
        (mod, "_frombuffer"): _np_numeric._frombuffer for mod in ("numpy._core.numeric", "numpy.core.numeric")
    },
    # pickle protocol 2 spells bytes (array data, dtype codes) as _codecs.encode(str, "latin1")
    ("_codecs", "encode"): codecs.encode,
}
_BUILD_TARGETS = (_ScalerState, _ArrayWrapper, np.ndarray, np.dtype)
_MAX_SCALER_BYTES = 1 << 26  # a 12-lead scaler is a few kB; refuse anything that could exhaust memory


class _ScalerUnpickler(pickle._Unpickler):  # type: ignore[name-defined]
    """Pure-Python unpickler (joblib's inline array bytes need it) that resolves only `_SCALER_GLOBALS`,
    sets state only on the objects those build, and refuses extension codes and persistent ids."""

    dispatch = dict(pickle._Unpickler.dispatch)  # type: ignore[attr-defined]

    def __init__(self, file: io.BytesIO):
        super().__init__(file)
        self._file = file

    def find_class(self, module: str, name: str) -> Any:
        if (
            self.proto < 3 and self.fix_imports
        ):  # Python 2 spellings (__builtin__, copy_reg), as pickle maps them
            module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
            module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        try:
            return _SCALER_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refused global {module}.{name}") from None

    def _build(self) -> None:
        if not isinstance(self.stack[-2], _BUILD_TARGETS):
            raise pickle.UnpicklingError(f"refused to set the state of a {type(self.stack[-2]).__name__}")
        pickle._Unpickler.load_build(self)  # type: ignore[attr-defined]
        if isinstance(self.stack[-1], _ArrayWrapper):
            self.stack[-1] = self._read_wrapped_array(self.stack[-1].state)

    def _refuse_extension(self) -> None:
        raise pickle.UnpicklingError("refused pickle extension code")

    dispatch[pickle.BUILD[0]] = _build
    for _op in (pickle.EXT1, pickle.EXT2, pickle.EXT4):
        dispatch[_op[0]] = _refuse_extension
    del _op

    def _read_wrapped_array(self, state: dict[str, Any]) -> np.ndarray:
        """The bytes joblib writes after a NumpyArrayWrapper (joblib.numpy_pickle.NumpyArrayWrapper.read_array)."""
        dtype, shape, order = state.get("dtype"), tuple(state.get("shape", ())), state.get("order", "C")
        if not isinstance(dtype, np.dtype) or not all(isinstance(n, int) and n >= 0 for n in shape):
            raise pickle.UnpicklingError("malformed joblib array header")
        if dtype.hasobject:  # joblib pickles object arrays inline: read them with the same restrictions
            array = _ScalerUnpickler(self._file).load()
            if not isinstance(array, np.ndarray):
                raise pickle.UnpicklingError("malformed joblib object array")
            return array
        if state.get("numpy_array_alignment_bytes") is not None:
            self._file.read(int.from_bytes(self._file.read(1), "little"))  # alignment padding
        nbytes = math.prod(shape) * dtype.itemsize
        data = self._file.read(nbytes)
        if len(data) != nbytes:
            raise pickle.UnpicklingError("joblib array data is truncated")
        flat = np.frombuffer(data, dtype=dtype).copy()
        return flat.reshape(shape[::-1]).T if order == "F" else flat.reshape(shape)


def _decompressed(raw: bytes) -> bytes:
    """joblib.dump(compress=...) output (zlib, gzip, bz2, lzma, xz) decompressed; other bytes as they are."""
    limit = _MAX_SCALER_BYTES
    if raw[:1] == b"\x78":
        out = zlib.decompressobj().decompress(raw, limit + 1)
    elif raw[:2] == b"\x1f\x8b":
        out = gzip.GzipFile(fileobj=io.BytesIO(raw)).read(limit + 1)
    elif raw[:3] == b"BZh":
        out = bz2.BZ2File(io.BytesIO(raw)).read(limit + 1)
    elif raw[:6] == b"\xfd7zXZ\x00" or raw[:3] == b"]\x00\x00":
        out = lzma.LZMAFile(io.BytesIO(raw)).read(limit + 1)
    else:
        return raw
    if len(out) > limit:
        raise pickle.UnpicklingError(f"decompresses to more than {limit} bytes")
    return out


def read_scaler_pickle(path: str | Path) -> dict[str, Any]:
    """Fitted attributes of a pickled (or joblib-dumped) scikit-learn StandardScaler, read without importing
    scikit-learn or running anything from the file: `mean_`, `scale_` (float64 arrays) and, where the file
    has them, `var_`, `n_features_in_`, `n_samples_seen_`, `with_mean`, `with_std`, `sklearn_version`,
    `feature_names_in_`. Any other content raises CheckpointError naming what was refused."""
    path = Path(path)
    with open(path, "rb") as f:
        raw = f.read(_MAX_SCALER_BYTES + 1)
    what = f"scaler pickle {path}"
    try:
        if len(raw) > _MAX_SCALER_BYTES:
            raise pickle.UnpicklingError(f"larger than {_MAX_SCALER_BYTES} bytes")
        obj = _ScalerUnpickler(io.BytesIO(_decompressed(raw))).load()
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{what}: {e}; only a scikit-learn StandardScaler with numpy arrays is read, and nothing in "
            "the file was executed"
        ) from None
    except Exception as e:  # truncated or malformed stream
        raise CheckpointError(
            f"{what}: not a readable StandardScaler pickle ({type(e).__name__}: {e})"
        ) from None
    if not isinstance(obj, _ScalerState):
        raise CheckpointError(f"{what}: holds a {type(obj).__name__}, not a StandardScaler")
    st = obj.state
    out: dict[str, Any] = {}
    for key in ("mean_", "scale_", "var_"):
        value = st.get(key)
        if value is None:
            if key != "var_":  # upstream reads mean_ and scale_ whatever with_mean / with_std say
                raise CheckpointError(
                    f"{what}: the scaler has no {key} (fitted with with_mean/with_std off?)"
                )
            continue
        arr = np.asarray(value)
        if arr.dtype.kind not in "fiu":
            raise CheckpointError(f"{what}: {key} is {arr.dtype}, not numeric")
        out[key] = arr.astype(np.float64)
    for key in ("n_features_in_", "n_samples_seen_", "with_mean", "with_std"):
        value = st.get(key)
        if isinstance(
            value, (bool, int, float, np.bool_, np.integer, np.floating)
        ):  # not the per-feature arrays
            value = value.item() if isinstance(value, np.generic) else value
            out[key] = int(value) if isinstance(value, float) and value.is_integer() else value
    if isinstance(st.get("_sklearn_version"), str):
        out["sklearn_version"] = st["_sklearn_version"]
    names = st.get("feature_names_in_")
    if isinstance(names, np.ndarray) and all(isinstance(n, str) for n in names.tolist()):
        out["feature_names_in_"] = [str(n) for n in names.tolist()]
    return out


def write_scaler_json(
    path: str | Path, attrs: dict[str, Any], lead_order: Sequence[str] | None = None
) -> Path:
    """Write a scaler in the JSON layout `load_scaler` reads (sklearn attribute names, as the golden
    `echoingecg/scaler.json`); `lead_order` records the lead each entry belongs to, if known."""
    doc: dict[str, Any] = {
        "format": "fitted attributes of a sklearn.preprocessing.StandardScaler (EchoingECG reads mean_, scale_)"
    }
    leads = list(lead_order) if lead_order else attrs.get("feature_names_in_")
    if leads:
        doc["lead_order"] = list(leads)
    for key, value in attrs.items():
        if key != "feature_names_in_":
            doc[key] = value.tolist() if isinstance(value, np.ndarray) else value
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1) + "\n")
    return path


def load_scaler(
    path: str | Path, n_features: int = 12, leads: Sequence[str] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(mean, scale) float64 of a per-lead scaler file: JSON or npz with `mean_`/`scale_` (sklearn names, as
    `stence scaler convert` writes) or `mean`/`scale`. Refused: pickles, non-finite values, scale <= 0,
    a length other than `n_features`, and a recorded `lead_order` other than `leads` (the weights' order)."""
    path = Path(path)
    what = f"scaler {path} (model.ecg_scaler)"
    suffix = path.suffix.lower()
    if suffix in (".pkl", ".pickle", ".joblib"):
        raise CheckpointError(
            f"{what}: pickles are not loaded (they can run code); convert it once with "
            f"`stence scaler convert {path} --out scaler.json` and point model.ecg_scaler at the JSON"
        )
    if suffix not in (".json", ".npz"):
        raise CheckpointError(f"{what}: expected a .json or .npz file")
    if not path.is_file():
        raise FileNotFoundError(f"{what}: no such file")
    try:
        if suffix == ".json":
            doc = json.loads(path.read_text())
        else:
            with np.load(path, allow_pickle=False) as z:  # an object array (a pickle) raises ValueError
                doc = {k: z[k] for k in z.files}
    except (ValueError, OSError, zipfile.BadZipFile) as e:
        raise CheckpointError(f"{what}: unreadable ({e})") from None
    if not isinstance(doc, dict):
        raise CheckpointError(f"{what}: expected an object with mean_ and scale_")

    def vector(*keys: str) -> np.ndarray:
        key = next((k for k in keys if k in doc), None)
        if key is None:
            raise CheckpointError(f"{what}: no {' or '.join(keys)}")
        try:
            v = np.asarray(doc[key], dtype=np.float64)
        except (TypeError, ValueError):
            raise CheckpointError(f"{what}: {key} is not a list of numbers") from None
        if v.ndim != 1 or len(v) != n_features:
            raise CheckpointError(f"{what}: {key} has shape {v.shape}, the encoder expects ({n_features},)")
        if not np.isfinite(v).all():
            raise CheckpointError(
                f"{what}: {key} has non-finite values at {np.flatnonzero(~np.isfinite(v)).tolist()}"
            )
        return v

    mean, scale = vector("mean_", "mean"), vector("scale_", "scale")
    if (scale <= 0).any():
        raise CheckpointError(
            f"{what}: scale must be > 0, not at leads {np.flatnonzero(scale <= 0).tolist()}"
        )
    n_in = doc.get("n_features_in_", doc.get("n_features_in"))
    if n_in is not None and np.asarray(n_in).tolist() != n_features:
        raise CheckpointError(f"{what}: n_features_in_ {np.asarray(n_in).tolist()} != {n_features}")
    recorded = doc.get("lead_order")
    if leads is not None and recorded is not None:
        recorded = [str(x) for x in np.asarray(recorded).tolist()]
        if [x.lower() for x in recorded] != [x.lower() for x in leads]:
            raise CheckpointError(
                f"{what}: fitted in lead order {recorded}, the encoder's weights use {list(leads)}; "
                "set model.lead_order to the scaler's order or use a scaler fitted in the weights' order"
            )
    return mean, scale


__all__ = [
    "SAFE_GLOBALS",
    "CheckpointError",
    "ContractWarning",
    "load_scaler",
    "read_scaler_pickle",
    "safe_torch_load",
    "write_scaler_json",
]
