"""The pseudonymisation secret stays in ingest: never a config value, refused when public or short on a real
export, read from the environment or a site-only file."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from stence.config import Config, ConfigError, apply_overrides, load_config
from stence.data.ingest import ingest
from stence.data.pseudonym import PUBLIC_SECRETS, SaltError, check_secret, resolve_salt
from stence.data.synth import SynthConfig, write_cohort
from stence.outputs import MARKER

DEMO_SECRET = next(iter(PUBLIC_SECRETS))


def test_a_secret_in_a_config_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="ingest.salt is refused.*STENCE_SALT"):
        apply_overrides(Config(), ["ingest.salt=abc"])
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({"ingest": {"salt": "from-yaml-secret"}}))
    with pytest.raises(ConfigError, match="ingest.salt is refused"):
        load_config(tmp_path / "c.yaml")


def test_salt_file_and_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    f = tmp_path / "secret"
    f.write_text("file-secret-0123456789\n")
    f.chmod(0o600)
    monkeypatch.setenv("STENCE_SALT", "env-secret-0123456789")
    assert resolve_salt(str(f), "STENCE_SALT") == "file-secret-0123456789"  # the file wins
    assert resolve_salt("", "STENCE_SALT") == "env-secret-0123456789"
    f.write_text("\n")
    with pytest.raises(SaltError, match="empty"):
        resolve_salt(str(f))


def test_public_and_short_secrets_only_for_synthetic_exports() -> None:
    assert check_secret(DEMO_SECRET, synthetic=True) is True
    assert check_secret("x", synthetic=True) is False
    with pytest.raises(SaltError, match="public default"):
        check_secret(DEMO_SECRET, synthetic=False)
    with pytest.raises(SaltError, match="at least 16"):
        check_secret("short-secret", synthetic=False)
    assert check_secret("a-real-site-secret-4f2e", synthetic=False) is False


def test_demo_secret_refused_on_a_real_export_and_marked_on_a_synthetic_one(tmp_path, monkeypatch) -> None:
    raw = tmp_path / "raw"
    write_cohort(raw, SynthConfig.preset("tiny", patients=6, seed=2))
    monkeypatch.setenv("STENCE_SALT", DEMO_SECRET)
    report = ingest(raw, tmp_path / "cohort", Config(), processes=1)
    meta = json.loads((tmp_path / "cohort" / "cohort.json").read_text())
    assert meta["synthetic_export"] is True and meta["public_demo_secret"] is True and report.public_secret
    assert "PUBLIC secret" in report.summary()
    real = tmp_path / "export"  # the same files without synth's marker: what a hospital export looks like
    shutil.copytree(raw, real)
    (real / MARKER).unlink()
    with pytest.raises(SaltError, match="public default"):
        ingest(real, tmp_path / "c2", Config(), processes=1)
    assert not (tmp_path / "c2.partial").exists()
    monkeypatch.setenv("STENCE_SALT", "a-real-site-secret-4f2e")
    ingest(real, tmp_path / "c2", Config(), processes=1)
    meta = json.loads((tmp_path / "c2" / "cohort.json").read_text())
    assert meta["synthetic_export"] is False and meta["public_demo_secret"] is False
