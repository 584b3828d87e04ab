"""Philips SierraECG / PhilipsECG XML exports (`<restingecgdata>`, versions 1.03-1.04.02) -> `EcgRecord`.

The `parsedwaveforms` element holds all leads for the full acquisition (10 s plus, on some carts, a 1 mV
calibration pulse near the end), base64 and usually XLI-compressed (see `xli.py` for why sierraecg's own
`read_file` is not used). XLI stores III, aVR, aVL and aVF as residuals, reconstructed here; uncompressed
data stores every lead as is. Samples are in units of `signalresolution` (1.03) / `resolution` (1.04) uV.
Identifiers come from the whole document outside the waveform, measurement and report-layout blocks.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Sequence
from pathlib import Path
from xml.etree.ElementTree import Element

import numpy as np

from stence.config import STANDARD_LEADS
from stence.data.ecg_formats import _ids
from stence.data.ecg_formats._leads import build_record, canonical_lead
from stence.data.ecg_formats._limits import check_extent, check_rate
from stence.data.ecg_formats._xml import child, local, parse_xml, text, walk
from stence.data.ecg_formats.xli import reconstruct_limb_leads, xli_decode
from stence.data.limits import Limits
from stence.data.wfdb_io import EcgRecord
from stence.errors import ECG_BAD_HEADER, ECG_BAD_WAVEFORM, ECG_UNSUPPORTED_FORMAT, BadInputError

SUPPORTED = {("SierraECG", "PhilipsECG"): ("1.03", "1.04", "1.04.01", "1.04.02")}  # as sierraecg 0.4.0
_LIMB_LEADS = ("I", "II", "III", "aVR", "aVL", "aVF")
_SKIP = frozenset(
    {
        "waveforms",
        "measurements",
        "interpretations",
        "signalcharacteristics",
        "reportformat",
        "reportgain",
        "reportbandwidth",
        "documenttype",
        "documentversion",
        "userdefines",
    }
)
_NAME_PARTS = ("firstname", "middlename", "lastname")
_BOILERPLATE = re.compile(
    r"(?i)(?:un)?confirmed(?: diagnosis| report)?\.?|"
)  # a signature line naming nobody
_NOT_IDS = frozenset(
    (
        "years months sex pacestatus race height weight reporttype reportdescription machine leadset "
        "acquisitiontype"
    ).split()
)
_KINDS = {
    "patientid": "patient_id",
    "documentname": "other_id",
    "filename": "other_id",
    "departmentid": "location",
    "departmentname": "location",
    "dateofbirth": "dob",
    "mdsignatureline": "physician",
    "comments": "free_text",
    "reasonfortest": "free_text",
}


def _number(value: str, what: str) -> float:
    try:
        return float(value)
    except (ValueError, OverflowError):
        raise BadInputError(ECG_BAD_HEADER, f"{what} is missing or not a number") from None


def _n_leads(sc: Element | None, pw: Element) -> int:
    n = _number(
        pw.get("numberofleads")
        or text(sc, "numberchannelsallocated")
        or text(sc, "numberchannelsvalid")
        or "12",
        "number of leads",
    )
    if not n.is_integer() or n < 1:
        raise BadInputError(ECG_BAD_HEADER, "number of leads is not a positive whole number")
    return int(n)


def _labels(sc: Element | None, pw: Element, n: int) -> list[str]:
    if labels := (pw.get("leadlabels") or "").split():
        return [canonical_lead(x) for x in labels[:n]] + [f"Channel {i + 1}" for i in range(len(labels), n)]
    std = text(sc, "acquisitiontype").upper() in ("STD-12", "10-WIRE")
    return [STANDARD_LEADS[i] if std and i < 12 else f"Channel {i + 1}" for i in range(n)]


def _samples(pw: Element, labels: list[str], n: int) -> list[np.ndarray]:
    """The leads as (n,) int64 arrays, limb leads reconstructed for XLI."""
    encoding = pw.get("dataencoding", "")
    if encoding == "Plain":
        try:
            flat = np.array((pw.text or "").split(), dtype=np.float64)  # (n_leads * n,)
        except ValueError:
            raise BadInputError(
                ECG_BAD_WAVEFORM, "Plain waveform holds a value that is not a number"
            ) from None
        if len(flat) < len(labels) * n:
            raise BadInputError(
                ECG_BAD_WAVEFORM, f"waveform has {len(flat)} values, {len(labels)} x {n} needed"
            )
        return list(flat[: len(labels) * n].reshape(len(labels), n))
    if encoding != "Base64":
        raise BadInputError(
            ECG_UNSUPPORTED_FORMAT, f"Philips waveform encoding {encoding[:20]!r} is not read"
        )
    try:
        data = base64.b64decode("".join((pw.text or "").split()), validate=True)
    except (binascii.Error, ValueError):
        raise BadInputError(ECG_BAD_WAVEFORM, "parsedwaveforms is not valid base64") from None
    method = pw.get("compression") or (pw.get("compressmethod") if pw.get("compressflag") == "True" else "")
    if method == "XLI":
        leads = xli_decode(data, len(labels), n)
        if tuple(labels[:6]) != _LIMB_LEADS:
            raise BadInputError(
                ECG_UNSUPPORTED_FORMAT, "XLI with a lead set whose limb leads cannot be rebuilt"
            )
        reconstruct_limb_leads(leads)
        return leads
    if method:
        raise BadInputError(ECG_UNSUPPORTED_FORMAT, f"Philips compression {method[:20]!r} is not read")
    if len(data) < 2 * len(labels) * n:
        raise BadInputError(
            ECG_BAD_WAVEFORM, f"waveform has {len(data)} bytes, {len(labels)} x {n} samples needed"
        )
    flat = np.frombuffer(data[: 2 * len(labels) * n], dtype="<i2").astype(np.int64)  # (n_leads * n,)
    return list(flat.reshape(len(labels), n))


def _leads(root: Element, limits: Limits) -> tuple[dict[str, np.ndarray], float]:
    doc = child(root, "documentinfo")
    dtype, version = text(doc, "documenttype"), text(doc, "documentversion")
    if not any(dtype in types and version in vers for types, vers in SUPPORTED.items()):
        raise BadInputError(
            ECG_UNSUPPORTED_FORMAT, f"Philips {dtype[:20]!r} {version[:20]!r} is not supported"
        )
    sc = child(root, "dataacquisition", "signalcharacteristics")
    pw = next((e for e in root.iter() if local(e.tag) == "parsedwaveforms"), None)
    if pw is None:
        raise BadInputError(ECG_BAD_WAVEFORM, "no parsedwaveforms element")
    rate = text(sc, "samplingrate") or text(sc, "samplerate")
    fs = _number(rate, "sampling rate")
    check_rate(fs, limits, rate)
    duration_ms = _number(
        pw.get("durationperchannel") or text(pw, "durationperchannel"), "durationperchannel"
    )
    if not 0 < duration_ms < float("inf"):
        raise BadInputError(ECG_BAD_HEADER, "durationperchannel must be a positive number of ms")
    n, n_leads = int(duration_ms * fs / 1000), _n_leads(sc, pw)
    check_extent(fs, n, n_leads, limits)
    labels = _labels(sc, pw, n_leads)
    res = text(sc, "signalresolution") or text(sc, "resolution")
    uv_per_unit = _number(res, "signal resolution")
    if not np.isfinite(uv_per_unit) or uv_per_unit <= 0:
        raise BadInputError(ECG_BAD_WAVEFORM, "signal resolution must be a positive number of uV")
    samples = _samples(pw, labels, n)
    return {lab: s * (uv_per_unit / 1000.0) for lab, s in zip(labels, samples, strict=True)}, fs


def _identifiers(root: Element) -> dict[str, str]:
    ids: dict[str, str] = {}
    _ids.add(ids, "patient_id", "patientid", text(child(root, "patient", "generalpatientdata"), "patientid"))
    for elem, path in walk(root, _SKIP):
        tag = local(elem.tag)
        for attr, value in elem.attrib.items():
            if local(attr) in ("date", "time"):
                _ids.add_date(ids, f"{tag}{local(attr)}", value)
        parts = {local(c.tag): (c.text or "") for c in elem if local(c.tag) in _NAME_PARTS}
        if parts:  # a person: <name> or <orderingphysician> with firstname / lastname children
            kind = next((r for t in (tag, *reversed(path)) if (r := _ids.role(t))), "name")
            _ids.add_person(ids, kind, tag, [parts.get(p, "") for p in _NAME_PARTS])
        value, k = (elem.text or "").strip(), _ids.norm(tag)
        if not value or len(elem) or k in _NOT_IDS or k in _NAME_PARTS:
            continue
        if k.endswith(("date", "time")) and k != "dateofbirth":
            _ids.add_date(ids, tag, value)
        elif kind := _ids.field_kind(tag, _KINDS):
            _ids.add(ids, kind, tag, value)
    for ud in (e for e in root.iter() if local(e.tag) == "userdefine"):  # free label / value pairs
        label, value = text(child(ud, "label")), text(child(ud, "value"))
        _ids.add(ids, _ids.generic_kind(label) or "other_id", label or "userdefine", value)
    for elem in (
        e for e in root.iter() if local(e.tag) in ("mdsignatureline", "leftstatement", "rightstatement")
    ):
        signature = local(elem.tag) == "mdsignatureline" and not _BOILERPLATE.fullmatch(
            (elem.text or "").strip()
        )
        if signature or _ids.PERSON_STATEMENT.search(elem.text or ""):
            _ids.add(ids, "physician", local(elem.tag), elem.text)
    return ids


def _meta(root: Element) -> dict[str, object]:
    gp = child(root, "patient", "generalpatientdata")
    acq = child(root, "dataacquisition")
    base_date = _ids.parse_date(acq.get("date", "") if acq is not None else "", ("%Y-%m-%d", "%m/%d/%Y"))
    years = text(gp, "age", "years")
    age = _ids.age_years(years) if years else None
    dob = _ids.parse_date(text(gp, "age", "dateofbirth") or text(gp, "dateofbirth"), ("%Y-%m-%d",))
    return {
        "age": age if age is not None else _ids.age_at(dob, base_date),
        "sex": _ids.parse_sex(text(gp, "sex")),
        "base_date": base_date,
        "acquisition_time": _ids.parse_time(acq.get("time", "")) if acq is not None else None,
    }


def read_philips(path: Path, leads: Sequence[str], limits: Limits) -> EcgRecord:
    """Read a Philips SierraECG XML export; see the module docstring."""
    root = parse_xml(path, limits)
    named, fs = _leads(root, limits)
    return build_record(named, fs, leads, "philips", _meta(root), _identifiers(root))
