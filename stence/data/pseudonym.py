"""Keyed pseudonyms for identifiers, and a leak scanner for everything the platform writes.

This is the one module that handles raw identifying values. A pseudonym is an HMAC-SHA256 of the
normalised value under a site secret (the salt), so it is stable across runs at one site, cannot be
reversed or recomputed without the secret, and differs between sites. The salt itself is never written
anywhere by the platform.
"""

from __future__ import annotations

import gzip
import hashlib
import hmac
import json
import logging
import os
import re
import zipfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from stence.data.cohort_io import read_npy_header

log = logging.getLogger(__name__)

# Prefix per kind of identifier; other kinds use their first letter, upper-cased.
KIND_PREFIX: dict[str, str] = {"patient": "P", "study": "S", "series": "R", "instance": "I", "ecg": "E"}
MIN_NEEDLE_LEN = 4  # shorter needles would match at random in binary files
_CHUNK = 8 << 20  # bytes read at a time by the scanner


class SaltError(ValueError):
    """No usable pseudonymisation secret."""


MIN_SECRET_LEN = 16  # characters; `openssl rand -hex 32` gives 64
# secrets written in this repository (the demo's default): anyone can recompute pseudonyms made with them
PUBLIC_SECRETS = frozenset({"demo-site-secret-change-me"})


def resolve_salt(salt_file: str = "", env_name: str = "STENCE_SALT") -> str:
    """The site secret: the first line of `salt_file` if set, else the environment variable `env_name`.

    The secret is never part of a config (configs are saved with every run, checkpoint and model)."""
    if salt_file:
        path = Path(salt_file)
        try:
            value = path.read_text(encoding="utf-8").strip()
        except OSError as e:
            raise SaltError(f"ingest.salt_file {path}: cannot be read ({e.strerror or e})") from e
        if not value:
            raise SaltError(f"ingest.salt_file {path} is empty")
        if path.stat().st_mode & 0o077:
            log.warning("ingest.salt_file %s can be read by other users: chmod 600 it", path)
        return value
    value = os.environ.get(env_name, "") if env_name else ""
    if value:
        return value
    raise SaltError(
        f"no pseudonymisation secret: set the environment variable {env_name or 'STENCE_SALT'} to a long "
        "random string kept at the site (e.g. `export STENCE_SALT=$(openssl rand -hex 32)`), or point "
        "ingest.salt_file at a site-only file holding it. The same secret must be used for every ingest of "
        "one cohort."
    )


def check_secret(secret: str, synthetic: bool) -> bool:
    """Refuse a public or short secret for a real export; returns whether the secret is a public one (allowed
    only for a synthetic export, and then recorded as such)."""
    public = secret in PUBLIC_SECRETS
    if synthetic:
        return public
    if public:
        raise SaltError("the pseudonymisation secret is the demo's public default, which anyone can use to map a "
                        "known MRN to its pseudonym: set STENCE_SALT to the site's own secret "
                        "(`openssl rand -hex 32`) for a real export")
    if len(secret) < MIN_SECRET_LEN:
        raise SaltError(f"the pseudonymisation secret has {len(secret)} characters; a real export needs at least "
                        f"{MIN_SECRET_LEN} (`openssl rand -hex 32`)")
    return False


def normalise_identifier(value: str) -> str:
    """Trim, collapse internal whitespace and casefold, so " Doe^John " and "DOE^JOHN" agree."""
    return re.sub(r"\s+", " ", str(value)).strip().casefold()


class Pseudonymizer:
    """Keyed hashing of identifiers: `pseudonym("12345", "patient") -> "P-3fa9..."` (16 hex digits)."""

    def __init__(self, salt: str):
        if not isinstance(salt, str) or not salt.strip():
            raise SaltError(
                "the pseudonymisation salt is empty: set STENCE_SALT (or ingest.salt) to the site secret"
            )
        self._key = salt.encode("utf-8")

    def __repr__(self) -> str:  # never show the key
        return "Pseudonymizer(salt=<hidden>)"

    def pseudonym(self, value: str, kind: str = "patient") -> str:
        """Kind prefix + first 16 hex digits of HMAC-SHA256(salt, kind + NUL + normalised value)."""
        if not kind or not kind.isidentifier():
            raise ValueError(f"kind must be a short name such as 'patient', got {kind!r}")
        norm = normalise_identifier(value)
        if not norm:
            raise ValueError(f"cannot pseudonymise an empty {kind} identifier")
        msg = f"{kind}\x00{norm}".encode()
        digest = hmac.new(self._key, msg, hashlib.sha256).hexdigest()[:16]
        return f"{KIND_PREFIX.get(kind, kind[0].upper())}-{digest}"


def needle_variants(needle: str) -> set[str]:
    """Forms of one identifier to look for: as given, with "^" read as a space, and its DICOM person-name
    parts (split on "^"), each as given, lower-, upper- and case-folded; only forms of >= MIN_NEEDLE_LEN
    characters."""
    base = str(needle).strip()
    forms = {base, re.sub(r"\s+", " ", base.replace("^", " ")).strip()}
    if "^" in base:
        forms.update(p.strip() for p in base.split("^"))
    out = {f(v) for v in forms for f in (str, str.lower, str.upper, str.casefold)}
    return {v for v in out if len(v) >= MIN_NEEDLE_LEN}


def _encodings(variants: Iterable[str]) -> list[bytes]:
    pats: set[bytes] = set()
    for v in variants:
        for enc in ("utf-8", "latin-1"):
            try:
                pats.add(v.encode(enc))
            except UnicodeEncodeError:
                continue
    return sorted(pats, key=len, reverse=True)


def _iter_files(paths: Iterable[Path]) -> Iterator[Path]:
    for p in paths:
        p = Path(p)
        if p.is_dir():
            yield from sorted(q for q in p.rglob("*") if q.is_file())
        elif p.is_file():
            yield p


def _chunks(path: Path, overlap: int) -> Iterator[bytes]:
    """Raw bytes of a file in chunks overlapping by `overlap` bytes."""
    with open(path, "rb") as fh:
        tail = b""
        while True:
            block = fh.read(_CHUNK)
            if not block:
                break
            data = tail + block
            yield data
            tail = data[-overlap:] if overlap else b""


def _npy_header(path: Path) -> bytes:
    """The text header of a .npy file (dtype, shape): its numeric body holds no text to leak."""
    with open(path, "rb") as fh:
        shape, fortran, dtype = read_npy_header(fh)
    return f"{shape} {fortran} {dtype}".encode()


def _json_strings(value: object) -> Iterator[str]:
    if isinstance(value, dict):
        for k, v in value.items():
            yield str(k)
            yield from _json_strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _json_strings(v)
    elif isinstance(value, str):  # numbers are measurements and counts the platform computed, not text
        yield value


def _streams(path: Path, overlap: int) -> Iterator[bytes]:
    """What a file says, as byte strings to search: the cell values of a parquet table (not the format's own
    metadata), the keys and values of a JSON document, the header of a .npy array, the contents of gzip and
    zip/npz members, and the raw bytes of anything else."""
    name = path.name.lower()
    try:
        if name.endswith(".parquet"):
            for col in pq.read_table(path).columns:
                if pa.types.is_integer(col.type) or pa.types.is_floating(col.type) or pa.types.is_boolean(col.type):
                    continue  # measurements and counts the platform computed (an offset of 120000 is no time)
                for batch in col.chunks:
                    yield "\x1f".join(map(str, batch.to_pylist())).encode("utf-8", "replace")
            return
        if name.endswith(".json"):
            yield "\x1f".join(_json_strings(json.loads(path.read_text(encoding="utf-8")))).encode("utf-8")
            return
        if name.endswith(".npy"):
            yield _npy_header(path)
            return
        if name.endswith(".gz"):
            with gzip.open(path, "rb") as fh:
                yield fh.read()
        elif name.endswith((".zip", ".npz")):
            with zipfile.ZipFile(path) as zf:
                for member in zf.namelist():
                    yield zf.read(member)
    except Exception as e:  # an unreadable container is still scanned raw; say so
        log.warning("leak scan: could not decode %s (%s); scanned its raw bytes only", path, type(e).__name__)
    yield from _chunks(path, overlap)


def _patterns(needles: Iterable[str], warn: bool = True) -> dict[str, list[bytes]]:
    patterns: dict[str, list[bytes]] = {}
    skipped = 0
    for n in dict.fromkeys(str(x) for x in needles):
        pats = _encodings(needle_variants(n))
        if pats:
            patterns[n] = pats
        else:
            skipped += 1
    if skipped and warn:
        log.warning("leak scan: %d identifier(s) shorter than %d characters skipped", skipped, MIN_NEEDLE_LEN)
    return patterns


def scan_files_for(paths: Iterable[Path], needles: Iterable[str]) -> list[tuple[str, str]]:
    """(file, needle) for every identifier found in what the files say (directories recursed; see `_streams`).

    Matching ignores ASCII case (and tries lower/upper forms otherwise), in UTF-8 and latin-1, for the
    value and its DICOM name parts, as a whole value: a match inside a longer word or number ("Field" in
    "fields", "1234" in "912345", "edda" inside a hex digest) does not count. Parquet numeric columns and JSON
    numbers are not text and are not searched. Needles shorter than
    MIN_NEEDLE_LEN are skipped with a warning (the warning gives their count, never their values).
    """
    patterns = _patterns(needles)
    if not patterns:
        return []
    overlap = max(len(p) for pats in patterns.values() for p in pats) - 1
    index = _PrefixIndex(patterns)
    hits: list[tuple[str, str]] = []
    for path in _iter_files(paths):
        found: set[str] = set()
        for stream in _streams(path, overlap):
            found |= {m[2] for m in index.search(stream.lower())}  # ASCII case-insensitive
            if len(found) == len(patterns):
                break
        hits += [(str(path), n) for n in patterns if n in found]
    return hits


class Redactor:
    """Removes whole-value occurrences of identifiers from free text the platform writes (quarantine details)
    before the final scan; the needle index is built once for many texts."""

    def __init__(self, needles: Iterable[str], mask: str = "<redacted>"):
        patterns = _patterns(needles, warn=False)  # the scan that follows reports skipped needles once
        self.index = _PrefixIndex(patterns) if patterns else None
        self.mask = mask

    def __call__(self, text: str) -> tuple[str, set[str]]:
        """(`text` with each identifier replaced by the mask, the identifiers found)."""
        if self.index is None or not text:
            return text, set()
        data = text.encode("utf-8")
        spans = sorted(self.index.search(data.lower()))
        out, last = [], 0
        for pos, n, _ in spans:
            if pos >= last:
                out.append(data[last:pos].decode("utf-8", "replace") + self.mask)
                last = pos + n
        out.append(data[last:].decode("utf-8", "replace"))
        return "".join(out), {m[2] for m in spans}


class _PrefixIndex:
    """Finds which needles occur in a byte string in one pass: every 4-byte window of the data is looked
    up (vectorised) among the needles' 4-byte prefixes, and only those rare candidate positions are
    compared in full. Scanning for thousands of identifiers costs about as much as scanning for one."""

    def __init__(self, patterns: dict[str, list[bytes]]):
        self.by_prefix: dict[int, list[tuple[bytes, str]]] = {}
        for needle, pats in patterns.items():
            for p in {q.lower() for q in pats}:
                key = int.from_bytes(p[:4], "little")
                self.by_prefix.setdefault(key, []).append((p, needle))
        keys = np.array(sorted(self.by_prefix), dtype=np.uint32)
        self.table = np.zeros(1 << 24, dtype=bool)  # a 16 MB direct lookup on the low 3 bytes
        self.table[keys & 0xFFFFFF] = True

    def search(self, data: bytes) -> list[tuple[int, int, str]]:
        """(position, length, needle) of every whole-value match in `data` (already lower-cased)."""
        a = np.frombuffer(data, dtype=np.uint8)
        if len(a) < 4:
            return []
        low3 = a[:-3].astype(np.uint32) | (a[1:-2].astype(np.uint32) << 8) | (a[2:-1].astype(np.uint32) << 16)
        found: list[tuple[int, int, str]] = []
        for pos in np.flatnonzero(self.table[low3]):  # (N-3,) windows whose first 3 bytes start a needle
            key = int(low3[pos]) | (int(a[pos + 3]) << 24)
            for p, needle in self.by_prefix.get(key, ()):
                if data.startswith(p, int(pos)) and _stands_alone(data, int(pos), p):
                    found.append((int(pos), len(p), needle))
        return found


_DIGITS = frozenset(b"0123456789")


def _same_class(a: int, b: int | None) -> bool:
    """Both bytes digits, or both letters (ASCII letters or any byte of a multi-byte character)."""
    if b is None:
        return False
    if a in _DIGITS or b in _DIGITS:
        return a in _DIGITS and b in _DIGITS
    letter = lambda c: (97 <= c <= 122) or (65 <= c <= 90) or c >= 0x80  # noqa: E731
    return letter(a) and letter(b)


def _stands_alone(data: bytes, pos: int, p: bytes) -> bool:
    """The match data[pos:pos+len(p)] is a whole value: the byte before it does not continue its first
    character's class (digit or letter), nor the byte after its last ("P12345678" holds the ID 12345678;
    "912345678" and the hex digest "3fedda91" hold neither 12345678 nor "Edda")."""
    before = data[pos - 1] if pos > 0 else None
    after = data[pos + len(p)] if pos + len(p) < len(data) else None
    if _same_class(p[0], before) or _same_class(p[-1], after):
        return False
    # a needle made only of hex digits ("edda", "120000") also occurs inside pseudonyms and digests by chance
    return not (all(c in _HEX for c in p) and (before in _HEX or after in _HEX))


_HEX = frozenset(b"0123456789abcdef")
