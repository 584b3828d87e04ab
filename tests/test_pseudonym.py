"""Keyed pseudonyms and the identifier leak scanner."""

from __future__ import annotations

import gzip
import json
import logging
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from stence.data.pseudonym import Pseudonymizer, SaltError, needle_variants, resolve_salt, scan_files_for

IDS = ["000000000000000", "fantom^as", "Doe^John^^Dr", "MRN-778812", "19700413"]


def test_pseudonym_is_deterministic_keyed_and_kind_separated() -> None:
    a, b = Pseudonymizer("site-secret-1"), Pseudonymizer("site-secret-2")
    p = a.pseudonym("12345")
    assert re.fullmatch(r"P-[0-9a-f]{16}", p)
    assert p == Pseudonymizer("site-secret-1").pseudonym("12345")  # stable across instances/runs
    assert p != b.pseudonym("12345")  # another site cannot link it
    assert p != a.pseudonym("12346")
    assert a.pseudonym("12345", "study").startswith("S-")
    assert a.pseudonym("12345", "study")[2:] != p[2:]  # same value, different kind -> unrelated hash
    assert a.pseudonym("1.2.3", "series").startswith("R-") and a.pseudonym("x1", "device").startswith("D-")
    # whitespace and case of IDs do not matter
    assert a.pseudonym("  DOE^John ") == a.pseudonym("doe^john") == a.pseudonym("Doe^John")
    assert a.pseudonym("doe john") != a.pseudonym("doejohn")


def test_pseudonym_contains_no_identifier_text() -> None:
    ps = Pseudonymizer("k")
    for v in IDS:
        out = ps.pseudonym(v)
        for variant in needle_variants(v):
            assert variant not in out.casefold()
    assert "k" not in repr(ps).replace("Pseudonymizer", "")


def test_empty_salt_and_empty_value_raise() -> None:
    with pytest.raises(SaltError, match="STENCE_SALT"):
        Pseudonymizer("")
    with pytest.raises(SaltError):
        Pseudonymizer("   ")
    with pytest.raises(ValueError):
        Pseudonymizer("k").pseudonym("  ")


def test_resolve_salt_prefers_the_site_file_then_environment(monkeypatch: pytest.MonkeyPatch,
                                                              tmp_path: Path) -> None:
    monkeypatch.setenv("MY_SALT", "from-env")
    (tmp_path / "salt").write_text("from-file\n")
    assert resolve_salt(str(tmp_path / "salt"), "MY_SALT") == "from-file"
    assert resolve_salt("", "MY_SALT") == "from-env"
    monkeypatch.delenv("MY_SALT")
    with pytest.raises(SaltError, match="STENCE_SALT|MY_SALT"):
        resolve_salt("", "MY_SALT")
    monkeypatch.delenv("STENCE_SALT", raising=False)
    with pytest.raises(SaltError, match="STENCE_SALT"):
        resolve_salt("", "STENCE_SALT")


def _write_parquet(path: Path, planted: str = "") -> None:
    """A manifest-like zstd parquet; `planted` sits in one row (not the min/max, so not in the footer)."""
    rng = np.random.default_rng(0)
    n = 5000
    notes = [f"{rng.integers(0, 2**60):x} ok" for _ in range(n)]
    if planted:
        notes[1234] = planted
    table = pa.table(
        {
            "patient": [f"P-{i:016x}" for i in rng.integers(0, 2**60, n)],
            "note": notes,
            "value": rng.standard_normal(n),
        }
    )
    pq.write_table(table, path, compression="zstd")


def test_scan_finds_planted_needles_and_nothing_in_clean_files(tmp_path: Path) -> None:
    clean = tmp_path / "clean"
    clean.mkdir()
    _write_parquet(clean / "manifest.parquet")
    np.save(clean / "cache.npy", np.random.default_rng(0).standard_normal((12, 500)).astype(np.float32))
    (clean / "run.log").write_text("epoch 1 loss 0.5\npatient P-3fa9c2d1e4b5a6f7 done\n")
    (clean / "meta.json").write_text(json.dumps({"study": "S-0123456789abcdef"}))
    assert scan_files_for([clean], IDS) == []

    dirty = tmp_path / "dirty"
    dirty.mkdir()
    _write_parquet(dirty / "manifest.parquet", "Patient FANTOM AS visit")
    raw = (dirty / "manifest.parquet").read_bytes()
    assert b"fantom" not in raw.lower()  # zstd hides it from a raw byte scan: the decoded scan finds it
    (dirty / "run.log").write_text("loading 000000000000000 ...\n", encoding="utf-8")
    (dirty / "notes.txt").write_bytes("Arzt: Dr. John Müller\n".encode("latin-1"))
    with gzip.open(dirty / "old.log.gz", "wt") as fh:
        fh.write("mrn-778812 seen\n")
    hits = set(scan_files_for([dirty], IDS + ["Müller"]))
    assert (str(dirty / "manifest.parquet"), "fantom^as") in hits
    assert (str(dirty / "run.log"), "000000000000000") in hits
    assert (str(dirty / "notes.txt"), "Müller") in hits  # latin-1 bytes
    assert (str(dirty / "notes.txt"), "Doe^John^^Dr") in hits  # the "John" name part
    assert (str(dirty / "old.log.gz"), "MRN-778812") in hits
    assert not any(h[0].endswith("notes.txt") and h[1] == "fantom^as" for h in hits)


def test_scan_of_utf8_text_and_plain_parquet(tmp_path: Path) -> None:
    f = tmp_path / "report.txt"
    f.write_text("Befund für Jürgen Groß, geboren 19700413\n", encoding="utf-8")
    p = tmp_path / "t.parquet"
    pq.write_table(pa.table({"name": ["x", "GROß^JÜRGEN"]}), p, compression="none")
    hits = scan_files_for([f, p], ["Groß^Jürgen", "19700413"])
    assert set(hits) == {(str(f), "Groß^Jürgen"), (str(f), "19700413"), (str(p), "Groß^Jürgen")}


def test_short_needles_are_skipped_and_reported_without_value(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    f = tmp_path / "a.txt"
    f.write_text("abc 12 xyz")
    with caplog.at_level(logging.WARNING, logger="stence.data.pseudonym"):
        assert scan_files_for([f], ["abc", "12"]) == []
    assert "2 identifier(s)" in caplog.text and "abc" not in caplog.text


def test_scan_real_dicom_finds_its_identifiers(shared_data: Path) -> None:
    dcm = shared_data / "angio" / "dicom" / "phantom_IM8.dcm"
    hits = {n for _, n in scan_files_for([dcm], ["fantom^as", "000000000000000", "not-in-there"])}
    assert hits == {"fantom^as", "000000000000000"}


def test_hex_looking_names_inside_digests_are_not_leaks(tmp_path: Path) -> None:
    """A name made of hex letters ("Edda", "Abbe") turns up inside pseudonyms and hashes by chance; only an
    occurrence that stands apart from a hex run counts."""
    digest = tmp_path / "manifest.json"
    digest.write_text(json.dumps({"patient": "P-3fedda91c0b2e4d7", "config_hash": "aabbe0123"}))
    assert scan_files_for([digest], ["Edda^Smith", "Abbe^Jones"]) == []
    leak = tmp_path / "run.log"
    leak.write_text("loading EDDA_scan.dcm\npatient P12345678 done\n")
    hits = set(scan_files_for([leak, digest], ["Edda^Smith", "12345678"]))
    assert hits == {(str(leak), "Edda^Smith"), (str(leak), "12345678")}


def test_whole_value_matching_ignores_identifiers_inside_other_words(tmp_path: Path) -> None:
    """A patient called "Field" must not stop an ingest because a file says "fields" or "field_count";
    the same name standing alone, or beside punctuation, is a leak."""
    clean = tmp_path / "report.json"
    clean.write_text(json.dumps({"fields_found": 3, "manifest": "Fieldwork summary", "n": 123456789}))
    pq.write_table(pa.table({"field_name": ["ok", "P-0a1b2c3d4e5f6a7b"], "n": [4471029, 1]}), tmp_path / "t.parquet")
    assert scan_files_for([clean, tmp_path / "t.parquet"], ["Field^Anna", "4471029", "23456789"]) == []
    leak = tmp_path / "leak.json"
    leak.write_text(json.dumps({"note": "seen by FIELD, Anna (MRN4471029)"}))
    assert {n for _, n in scan_files_for([leak], ["Field^Anna", "4471029"])} == {"Field^Anna", "4471029"}
