"""Philips XLI waveform decompression, bounded and exact, on top of sierraecg's LZW decoder.

sierraecg 0.4.0 (`sierraecg.read_file`) reads ordinary XLI files correctly (the tests check parity) but
is not fit for untrusted input, least of all under numpy 2:
- it reconstructs III, aVR, aVL and aVF in int16 numpy scalars, which wrap around (numpy 2 emits only a
  RuntimeWarning) when I + II or II - I leave the int16 range;
- its delta decoder stores each sample into an int16 array, which raises OverflowError under numpy 2
  when a decoded sample leaves the int16 range;
- it trusts the chunk sizes in the XLI headers (a negative one steps its chunk loop backwards and ends
  in IndexError or OverflowError), and nothing bounds what LZW may expand to;
- for uncompressed files it assigns into read-only `np.frombuffer` arrays (ValueError).
So only its `LzwDecoder` is used; unpacking, delta decoding and lead reconstruction are done here in
int64, and a decoded sample outside int16 (which no device can have stored) is ECG_BAD_WAVEFORM.

Layout: per lead, an 8-byte header (int32 LE compressed size, 2 unused bytes, int16 LE start value) and
the LZW stream (10-bit codes) of the delta buffer: the high bytes of all deltas, then their low bytes.
"""

from __future__ import annotations

import numpy as np
from sierraecg.lzw import LzwDecoder

from stence.errors import ECG_BAD_WAVEFORM, BadInputError

_INT16 = (-(1 << 15), (1 << 15) - 1)


def _lzw_bytes(chunk: bytes, max_bytes: int) -> np.ndarray:
    """The LZW-decoded bytes of one lead, at most `max_bytes` (a longer stream is refused)."""
    decoder = LzwDecoder(chunk, bits=10)
    out = bytearray()
    try:
        while (b := decoder.read()) != -1:
            if len(out) >= max_bytes:
                raise BadInputError(ECG_BAD_WAVEFORM, "XLI lead decompresses to more samples than declared")
            out.append(b & 0xFF)
    except (IndexError, KeyError, ValueError) as e:  # a code referring to nothing: corrupt stream
        raise BadInputError(ECG_BAD_WAVEFORM, f"corrupt XLI (LZW) stream ({type(e).__name__})") from None
    if len(out) % 2:
        out.append(0)
    return np.frombuffer(bytes(out), dtype=np.uint8)


def _decode_deltas(buf: np.ndarray, first: int) -> np.ndarray:
    """(n,) int64 samples from the (2n,) delta buffer, as sierraecg's `xli_decode_deltas` computes them:
    s[0], s[1] as stored, then s[i] = 2 s[i-1] - s[i-2] - c[i] with c[2] = `first`, c[i] = d[i-1] - 64."""
    half = len(buf) // 2
    d = ((buf[:half].astype(np.int64) << 8) | buf[half : 2 * half]).astype(np.uint16).view(np.int16)  # (n,)
    d = d.astype(np.int64)
    if len(d) < 3:
        return d
    c = np.concatenate(([first], d[2:-1] - 64))  # (n-2,) second differences, negated
    steps = (d[1] - d[0]) - np.cumsum(c)  # (n-2,) s[i] - s[i-1] for i >= 2
    return np.concatenate((d[:2], d[1] + np.cumsum(steps)))


def xli_decode(data: bytes, n_leads: int, n_samples: int) -> list[np.ndarray]:
    """The first `n_leads` leads of an XLI stream as (n_samples,) int64 arrays (extra leads ignored)."""
    leads: list[np.ndarray] = []
    offset = 0
    while offset < len(data) and len(leads) < n_leads:
        header = data[offset : offset + 8]
        size = int.from_bytes(header[0:4], "little", signed=True)
        first = int.from_bytes(header[6:8], "little", signed=True)
        if len(header) < 8 or size < 0 or offset + 8 + size > len(data):
            raise BadInputError(ECG_BAD_WAVEFORM, f"XLI lead {len(leads) + 1}: chunk header out of bounds")
        samples = _decode_deltas(_lzw_bytes(data[offset + 8 : offset + 8 + size], 2 * n_samples + 1), first)
        if len(samples) != n_samples:
            raise BadInputError(
                ECG_BAD_WAVEFORM,
                f"XLI lead {len(leads) + 1}: {len(samples)} samples, the file says {n_samples}",
            )
        if samples.min() < _INT16[0] or samples.max() > _INT16[1]:
            raise BadInputError(
                ECG_BAD_WAVEFORM, f"XLI lead {len(leads) + 1}: samples outside 16 bits (corrupt)"
            )
        leads.append(samples)
        offset += 8 + size
    if len(leads) < n_leads:
        raise BadInputError(ECG_BAD_WAVEFORM, f"XLI stream holds {len(leads)} leads, the file says {n_leads}")
    return leads


def reconstruct_limb_leads(leads: list[np.ndarray]) -> None:
    """Turn the stored residuals of III, aVR, aVL, aVF (leads 3-6) into the leads, in place, in int64.

    As sierraecg, sierraecg.js and the C# SierraECG library do after XLI decompression (floor division).
    """
    i, ii, r3, r_avr, r_avl, r_avf = leads[:6]
    iii = ii - i - r3
    leads[2] = iii
    leads[3] = -r_avr - (i + ii) // 2
    leads[4] = (i - iii) // 2 - r_avl
    leads[5] = (ii + iii) // 2 - r_avf
