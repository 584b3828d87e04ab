"""`stence scaler convert`: EchoingECG's pickled StandardScaler -> the scaler JSON `model.ecg_scaler` reads.

The pickle is read with the allow-listing unpickler of stence.models.safe_load (nothing in the file runs);
the JSON is written beside `out`, loaded back as `model.ecg_scaler` would load it, and only then renamed into
place."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from stence.models.base import LEAD_ORDERS
from stence.models.safe_load import CheckpointError, load_scaler, read_scaler_pickle, write_scaler_json


class ScalerRefused(RuntimeError):
    """Nothing written: `out` is not a .json file, is the input, or exists without `overwrite` (`code` 2), or
    the pickle is not an accepted StandardScaler / its leads do not match (`code` 1)."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


@dataclass
class ScalerConverted:
    """The JSON written, its number of leads, and the scikit-learn version the pickle names (None if none)."""

    out: Path
    n_leads: int
    sklearn_version: str | None = None


def lead_order(value: str | None) -> list[str] | None:
    """--lead-order: a known order's name (standard, mimic), or comma-separated lead names; None if not given."""
    if not value:
        return None
    return list(LEAD_ORDERS[value]) if value in LEAD_ORDERS else [s.strip() for s in value.split(",")]


def convert_scaler(src: str | Path, out: str | Path, lead_order_value: str | None = None,
                   overwrite: bool = False) -> ScalerConverted:
    """Convert the StandardScaler pickle `src` to the scaler JSON `out` (see the module docstring); raises
    ScalerRefused with nothing left behind."""
    src, out = Path(src), Path(out)
    tmp = out.with_name(out.stem + ".tmp.json")
    if out.suffix.lower() != ".json":
        raise ScalerRefused(f"--out {out} must end in .json (the format model.ecg_scaler reads)", 2)
    if out.resolve() == src.resolve():
        raise ScalerRefused(f"--out {out} is the input file", 2)
    if out.exists() and not overwrite:
        raise ScalerRefused(f"{out} exists; pass --overwrite to replace it", 2)
    leads = lead_order(lead_order_value)
    try:
        attrs = read_scaler_pickle(src)
        n = len(attrs["mean_"])
        if leads is not None and len(leads) != n:
            raise CheckpointError(f"--lead-order names {len(leads)} leads, the scaler has {n} entries")
        write_scaler_json(tmp, attrs, lead_order=leads)
        load_scaler(tmp, n_features=n)  # what was written is what model.ecg_scaler accepts
        tmp.replace(out)
    except (CheckpointError, FileNotFoundError) as e:
        tmp.unlink(missing_ok=True)
        raise ScalerRefused(str(e), 1) from e
    return ScalerConverted(out, n, str(attrs["sklearn_version"]) if "sklearn_version" in attrs else None)


__all__ = ["ScalerConverted", "ScalerRefused", "convert_scaler", "lead_order"]
