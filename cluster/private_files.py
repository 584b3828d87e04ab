"""Files only their owner may read (mode 600 from the first byte, in a mode-700 folder): MLflow credentials
files and the Ray auth token's copies. Standard library only, so the token and job actions do not import
MLflow for it."""

from __future__ import annotations

import os
from pathlib import Path


def write_private(path: str | Path, text: str) -> Path:
    """Write `text` to `path` with mode 600 from the first byte (folder created with mode 700)."""
    path = Path(path).expanduser()
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    tmp.replace(path)
    return path


__all__ = ["write_private"]
