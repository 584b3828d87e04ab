"""Philips SierraECG XML: XLI files written here and read back, parity with sierraecg where it is correct, and
its numpy-2 pitfalls (int16 wrap-around, overflow, corrupt chunks) read exactly or refused with a reason."""

from __future__ import annotations

import base64
import struct
import warnings
from pathlib import Path

import numpy as np
import pytest
import sierraecg

from stence.data.ecg_formats import read_ecg_file
from stence.errors import (
    ECG_BAD_HEADER,
    ECG_BAD_WAVEFORM,
    ECG_UNSUPPORTED_FORMAT,
)
from tests.ecg_format_helpers import PHILIPS, refused

# ---- Philips: XLI written here, read back; sierraecg's numpy-2 pitfalls ------------------------------


def _lzw_encode(data: bytes, bits: int = 10) -> bytes:
    """LZW with `bits`-bit codes packed MSB first: the inverse of sierraecg's `LzwDecoder`."""
    table, next_code, max_code = {bytes([i]): i for i in range(256)}, 256, (1 << bits) - 2
    codes, w = [], b""
    for byte in data:
        wc = w + bytes([byte])
        if wc in table:
            w = wc
            continue
        codes.append(table[w])
        if next_code <= max_code:
            table[wc], next_code = next_code, next_code + 1
        w = bytes([byte])
    codes += [table[w]] if w else []
    acc, n_bits, out = 0, 0, bytearray()
    for c in codes:
        acc, n_bits = (acc << bits) | c, n_bits + bits
        while n_bits >= 8:
            n_bits -= 8
            out.append((acc >> n_bits) & 0xFF)
    if n_bits:
        out.append((acc << (8 - n_bits)) & 0xFF)
    return bytes(out)


def _xli_lead(s: np.ndarray, size: int | None = None) -> bytes:
    """One XLI chunk holding samples `s` (second differences + 64, high bytes then low bytes)."""
    s = s.astype(np.int64)
    d = np.zeros(len(s), np.int64)
    d[:2], first = s[:2], int(2 * s[1] - s[0] - s[2])
    d[2:-1] = 2 * s[2:-1] - s[1:-2] - s[3:] + 64
    u = (d & 0xFFFF).astype(np.uint16)
    comp = _lzw_encode((u >> 8).astype(np.uint8).tobytes() + (u & 0xFF).astype(np.uint8).tobytes())
    return struct.pack("<iHh", len(comp) if size is None else size, 0, first) + comp


def _stored(true: np.ndarray) -> np.ndarray:
    """(12, T) true leads -> what XLI stores: III, aVR, aVL, aVF as residuals from I and II."""
    i, ii, iii, avr, avl, avf = true[:6]
    out = true.copy()
    out[2], out[3] = ii - i - iii, -avr - (i + ii) // 2
    out[4], out[5] = (i - iii) // 2 - avl, (ii + iii) // 2 - avf
    return out


def _true_leads(i: np.ndarray, ii: np.ndarray) -> np.ndarray:
    """(12, T) int64 leads in units of 5 uV from I and II, limb leads as the cart computes them."""
    iii = ii - i
    chest = [np.roll(i, 7 * k) + 10 * k for k in range(6)]
    return np.stack([i, ii, iii, -(i + ii) // 2, (i - iii) // 2, (ii + iii) // 2, *chest])


def _ecg_like(n: int = 5000, fs: int = 500, amp: int = 200, base: int = 0) -> np.ndarray:
    t = np.arange(n) / fs
    beats = sum(np.exp(-(((t - c) / 0.02) ** 2)) for c in np.arange(0.3, n / fs, 0.8))
    return (base + amp * beats + 10 * np.sin(2 * np.pi * 0.3 * t)).astype(np.int64)


def _philips_file(
    path: Path,
    chunks: bytes,
    n: int,
    fs: int = 500,
    extra: str = "",
    version: str = "1.03",
    attrs: str = 'compressflag="True" compressmethod="XLI" dataencoding="Base64"',
    body: str | None = None,
) -> Path:
    """A SierraECG 1.03 (or PhilipsECG 1.04) file around the waveform `chunks` (or the text `body`)."""
    doc, res = ("SierraECG", "signalresolution") if version == "1.03" else ("PhilipsECG", "resolution")
    body = base64.encodebytes(chunks).decode() if body is None else body
    path.write_text(
        f"""<?xml version="1.0" encoding="UTF-8"?>
<restingecgdata xmlns="http://www3.medical.philips.com">
 <documentinfo><documentname>doc-1234.xml</documentname><documenttype>{doc}</documenttype>
  <documentversion>{version}</documentversion></documentinfo>
 <reportinfo date="2020-01-02" time="10:11:12"/>
 <dataacquisition date="2020-01-02" time="10:11:12"><acquirer><operatorid>TECH-9</operatorid>
  <institutionname>St Elsewhere</institutionname><departmentname>Cardio 3</departmentname></acquirer>
  <signalcharacteristics><samplingrate>{fs}</samplingrate><{res}>5</{res}>
  <acquisitiontype>STD-12</acquisitiontype><numberchannelsallocated>12</numberchannelsallocated>
  <numberchannelsvalid>12</numberchannelsvalid></signalcharacteristics></dataacquisition>
 <patient><generalpatientdata><patientid>PX-77</patientid><name><lastname>Doe</lastname>
  <firstname>Jane</firstname></name><age><dateofbirth>1960-03-04</dateofbirth></age><sex>Female</sex>
 </generalpatientdata></patient>{extra}
 <waveforms><parsedwaveforms {attrs} durationperchannel="{n * 1000 // fs}">{body}</parsedwaveforms></waveforms>
</restingecgdata>""",
        "utf-8",
    )
    return path


def test_philips_matches_sierraecg_on_the_real_file(vendor: Path) -> None:
    ref = sierraecg.read_file(str(vendor / PHILIPS))  # correct here: no sample leaves int16
    ints = np.stack([lead.samples.astype(np.int64) for lead in ref.leads])  # (12, 5500)
    rec = read_ecg_file(vendor / PHILIPS)
    np.testing.assert_allclose(rec.signal, ints * 5e-3, atol=1e-6)


def test_philips_written_here_round_trips_with_identifiers(tmp_path: Path) -> None:
    true = _true_leads(_ecg_like(), _ecg_like(amp=300))
    path = _philips_file(tmp_path / "p.xml", b"".join(_xli_lead(s) for s in _stored(true)), 5000)
    ref = np.stack([lead.samples.astype(np.int64) for lead in sierraecg.read_file(str(path)).leads])
    np.testing.assert_array_equal(ref, true)  # the encoder above is what sierraecg decodes
    rec = read_ecg_file(path)
    np.testing.assert_allclose(rec.signal, true * 5e-3, atol=1e-6)
    ids = set(rec.identifiers.values())
    assert rec.identifiers["patient_id"] == "PX-77"
    assert {
        "Jane Doe",
        "Doe",
        "Jane",
        "1960-03-04",
        "TECH-9",
        "St Elsewhere",
        "Cardio 3",
        "doc-1234.xml",
    } <= ids
    assert rec.meta["sex"] == "F" and 59 < rec.meta["age"] < 60 and rec.meta["acquisition_time"] == "10:11:12"


def test_philips_1_04_and_uncompressed_variants(tmp_path: Path) -> None:
    true = _true_leads(_ecg_like(1000), _ecg_like(1000, amp=300))  # (12, 1000) in units of 5 uV
    xli = b"".join(_xli_lead(s) for s in _stored(true))
    labels = 'numberofleads="12" leadlabels="I II III aVR aVL aVF V1 V2 V3 V4 V5 V6"'
    v104 = _philips_file(
        tmp_path / "a.xml",
        xli,
        1000,
        version="1.04",
        attrs=f'compression="XLI" dataencoding="Base64" {labels}',
    )
    raw16 = true.astype("<i2").tobytes()  # uncompressed: every lead stored as it is
    plain = _philips_file(tmp_path / "b.xml", raw16, 1000, attrs='compressflag="False" dataencoding="Base64"')
    text = _philips_file(
        tmp_path / "c.xml", b"", 1000, attrs='dataencoding="Plain"', body=" ".join(map(str, true.ravel()))
    )
    for path in (v104, plain, text):
        np.testing.assert_allclose(read_ecg_file(path).signal, true * 5e-3, atol=1e-6)
    refused(_philips_file(tmp_path / "d.xml", xli, 1000, version="1.02"), ECG_UNSUPPORTED_FORMAT)
    refused(
        _philips_file(tmp_path / "e.xml", raw16[:-2], 1000, attrs='dataencoding="Base64"'), ECG_BAD_WAVEFORM
    )


def test_philips_limb_leads_beyond_int16_are_exact_where_sierraecg_wraps(tmp_path: Path) -> None:
    i = -_ecg_like(amp=2000, base=18000)  # I + II and II - I leave int16: III reaches ~40000 units
    true = _true_leads(i, -i)
    stored = _stored(true)
    assert np.abs(stored).max() < 2**15 <= np.abs(true).max()  # storable, though the leads are not
    path = _philips_file(tmp_path / "p.xml", b"".join(_xli_lead(s) for s in stored), 5000)
    rec = read_ecg_file(path)
    np.testing.assert_allclose(rec.signal, true * 5e-3, rtol=1e-6, atol=1e-4)
    with warnings.catch_warnings():  # sierraecg 0.4.0 under numpy 2: int16 scalars wrap around
        warnings.simplefilter("ignore")
        wrapped = sierraecg.read_file(str(path)).leads[2].samples.astype(np.int64)
    assert not np.array_equal(wrapped, true[2])


def test_philips_corrupt_xli_is_refused_not_crashed(tmp_path: Path) -> None:
    n, good = 500, [_xli_lead(s) for s in _stored(_true_leads(_ecg_like(500), _ecg_like(500)))]
    out_of_range = np.concatenate(([30000, 32000, 39000], np.full(n - 3, 39000)))  # decodes beyond int16
    bad = _philips_file(tmp_path / "a.xml", _xli_lead(out_of_range) + b"".join(good[1:]), n)
    with pytest.raises(OverflowError):  # what sierraecg 0.4.0 does under numpy 2
        sierraecg.read_file(str(bad))
    refused(bad, ECG_BAD_WAVEFORM)
    # a negative chunk size steps sierraecg's chunk loop backwards (IndexError / OverflowError there)
    refused(
        _philips_file(tmp_path / "b.xml", _xli_lead(_ecg_like(n), size=-16) + b"".join(good[1:]), n),
        ECG_BAD_WAVEFORM,
    )
    refused(_philips_file(tmp_path / "c.xml", b"".join(good[:11]), n), ECG_BAD_WAVEFORM)  # 11 of 12 leads
    refused(_philips_file(tmp_path / "d.xml", b"".join(good), 400), ECG_BAD_WAVEFORM)  # more than declared
    refused(_philips_file(tmp_path / "e.xml", b"".join(good), n, fs=5), ECG_BAD_HEADER)
