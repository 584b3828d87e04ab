"""Output folders the platform owns: no command replaces or writes into a folder it did not write.

Every command that writes an output folder (ingest, synth, probe/finetune results, feature caches,
exports) claims it first with `claim_output`. A folder is ours when it holds the marker file
`.stence-output.json` naming the kind of output (`cohort`, `synth`, `results`, ...). Claiming refuses,
with one line and nothing touched:
  - an output equal to, inside, or containing one of the command's inputs;
  - an existing file, or a non-empty folder without our marker (an unrelated folder, an export);
  - a folder holding another kind of stence output;
  - our own earlier output of the same kind, unless `overwrite` is set.
A new or empty folder is claimed by writing the marker into it.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterable
from pathlib import Path

MARKER = ".stence-output.json"


class OutputRefused(RuntimeError):
    """An output path the command must not write; the message is one line saying why and what to do."""


def _within(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def output_kind(folder: str | Path) -> str | None:
    """The kind of stence output a folder holds (from its marker), or None if it holds no marker."""
    marker = Path(folder) / MARKER
    if not marker.is_file():
        return None
    try:
        return str(json.loads(marker.read_text()).get("kind") or "") or None
    except (OSError, ValueError):
        return None


def check_output(
    out: str | Path, kind: str, inputs: Iterable[str | Path] = (), overwrite: bool = False, flag: str = "--overwrite"
) -> Path:
    """Resolve `out` and check that `kind` may be written there (see the module docstring); touches nothing."""
    given = Path(out).expanduser()
    if given.is_symlink() and not given.exists():
        raise OutputRefused(f"output {given} is a dangling symbolic link; choose another folder")
    path = given.resolve()
    for src in inputs:
        s = Path(src).expanduser().resolve()
        if _within(path, s):
            raise OutputRefused(f"output {path} is {'the input' if path == s else 'inside the input'} {s}; "
                                "choose a folder outside it")
        if _within(s, path):
            raise OutputRefused(f"output {path} contains the input {s}; choose a folder outside it")
    if not path.exists():
        return path
    if not path.is_dir():
        raise OutputRefused(f"output {path} exists and is not a folder; choose another path")
    if not any(path.iterdir()):
        return path
    found = output_kind(path)
    if found is None:
        raise OutputRefused(f"output {path} is a non-empty folder that stence did not write; "
                            "choose a new or empty folder")
    if found != kind:
        raise OutputRefused(f"output {path} holds a stence {found} output, not a {kind}; choose another folder")
    if not overwrite:
        raise OutputRefused(f"output {path} holds an earlier {kind}; pass {flag} to replace it")
    return path


def mark_output(folder: str | Path, kind: str) -> Path:
    """Write the ownership marker into `folder` (created if needed)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    (folder / MARKER).write_text(json.dumps({"kind": kind, "written": stamp}) + "\n")
    return folder


def claim_output(
    out: str | Path, kind: str, inputs: Iterable[str | Path] = (), overwrite: bool = False, flag: str = "--overwrite"
) -> Path:
    """`check_output`, then create the folder and mark it as ours. Returns the resolved path."""
    path = check_output(out, kind, inputs, overwrite, flag)
    return mark_output(path, kind)
