"""Lead naming, the derived limb leads, and assembling an `EcgRecord` from named leads in mV.

Every reader hands its decoded leads here as {name: (T,) float64 mV}; missing III, aVR, aVL and aVF are
derived from I and II (Einthoven and Goldberger), rows are put in the requested order (names matched
case-insensitively) and the shared metadata keys are filled in.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from stence.data.wfdb_io import EcgRecord
from stence.errors import ECG_BAD_WAVEFORM, ECG_MISSING_LEADS, BadInputError

_CANONICAL = {
    name.casefold(): name
    for name in (
        "I",
        "II",
        "III",
        "aVR",
        "aVL",
        "aVF",
        "V1",
        "V2",
        "V3",
        "V4",
        "V5",
        "V6",
    )
}

# (T,) arrays of leads I and II (mV) -> the derived limb lead (mV).
LIMB_FORMULAS = {
    "III": lambda i, ii: ii - i,
    "aVR": lambda i, ii: -(i + ii) / 2,
    "aVL": lambda i, ii: i - ii / 2,
    "aVF": lambda i, ii: ii - i / 2,
}


def canonical_lead(name: str) -> str:
    """The standard spelling of a lead name ("avr" -> "aVR", " v1 " -> "V1"); other names stripped."""
    bare = re.sub(r"\s+", "", name)
    return _CANONICAL.get(bare.casefold(), bare)


def derive_limb_leads(named: dict[str, np.ndarray]) -> list[str]:
    """Add III, aVR, aVL, aVF computed from I and II where absent; returns the names added."""
    if "I" not in named or "II" not in named:
        return []
    added = [lead for lead in LIMB_FORMULAS if lead not in named]
    for lead in added:
        named[lead] = LIMB_FORMULAS[lead](named["I"], named["II"])
    return added


def stack_leads(named: Mapping[str, np.ndarray], leads: Sequence[str]) -> np.ndarray:
    """(len(leads), T) float32 mV with rows in `leads` order (names matched case-insensitively).

    ECG_MISSING_LEADS when a requested lead is absent; ECG_BAD_WAVEFORM when the selected leads differ in
    length or hold non-finite values (an overflowing scale).
    """
    index = {name.casefold(): name for name in named}
    missing = [lead for lead in leads if lead.strip().casefold() not in index]
    if missing:
        raise BadInputError(
            ECG_MISSING_LEADS,
            f"missing lead(s) {', '.join(missing)}; the file has {', '.join(named) or 'no leads'}",
        )
    rows = [named[index[lead.strip().casefold()]] for lead in leads]
    lengths = sorted({len(r) for r in rows})
    if len(lengths) > 1:
        raise BadInputError(ECG_BAD_WAVEFORM, f"leads of different lengths ({', '.join(map(str, lengths))})")
    if not lengths or lengths[0] == 0:
        raise BadInputError(ECG_BAD_WAVEFORM, "the waveform has no samples")
    sig = np.stack(rows).astype(np.float32)  # len(leads) x (T,) -> (len(leads), T)
    if not np.isfinite(sig).all():
        raise BadInputError(ECG_BAD_WAVEFORM, "amplitudes are not finite after scaling (impossible scale)")
    return sig


def build_record(
    named: dict[str, np.ndarray],
    fs: float,
    leads: Sequence[str],
    fmt: str,
    meta: dict[str, Any],
    identifiers: dict[str, str],
    derive: bool = True,
) -> EcgRecord:
    """An `EcgRecord` from decoded leads {name: (T,) mV}; `meta` gives age, sex, base_date and
    acquisition_time (missing ones become None), the rest is filled in here."""
    derived = derive_limb_leads(named) if derive else []
    sig = stack_leads(named, leads)
    full = {"age": None, "sex": None, "base_date": None, "acquisition_time": None, **meta}
    full.update(
        n_samples_orig=int(sig.shape[1]),
        fs_orig=float(fs),
        format=fmt,
        signal_files=[],
        comments_kept=[],
        derived_leads=[lead for lead in derived if lead.casefold() in {x.casefold() for x in leads}],
    )
    return EcgRecord(signal=sig, fs=float(fs), leads=tuple(leads), meta=full, identifiers=identifiers)
