"""The Ray cluster's auth token on the submitting machine: created and kept private (mode 600).

`ray get-auth-token --generate` writes `~/.ray/auth_token` with the default umask, i.e. readable by every
local user (0644), and prints the token. `ensure_token` is the private equivalent behind
`stence cluster token`: it creates the token with mode 600 from the first byte (or tightens an existing
file), copies it into the folder `cluster.yaml` mounts on every node, and never prints it.
`check_token_file` is what every `stence cluster` command runs first: a token file others can read is made
private with a warning when it is ours, and refused when it is not.
"""

from __future__ import annotations

import os
import secrets
import stat
from collections.abc import Mapping
from pathlib import Path

from stence.cluster.private_files import write_private

TOKEN_NAME = "auth_token"
NODE_AUTH_DIR = Path("~/.stence-auth")  # mounted on every node by cluster.yaml / cluster/onprem.yaml


class TokenError(RuntimeError):
    """The token file cannot be made private; the message says what to do."""


def default_token_path(environ: Mapping[str, str] | None = None) -> Path:
    """RAY_AUTH_TOKEN_PATH, else ~/.ray/auth_token (where Ray's clients look)."""
    env = os.environ if environ is None else environ
    return Path(env.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / TOKEN_NAME).expanduser()


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def check_token_file(path: Path) -> str | None:
    """Make `path` private (600) if group or others can read it; returns a warning saying so, or None.

    A file owned by another user is refused instead (we cannot and should not change it)."""
    mode = _mode(path)
    if not mode & 0o077:
        return None
    if path.stat().st_uid != os.geteuid():
        raise TokenError(f"the Ray auth token {path} is readable by others (mode {mode:o}) and not yours to "
                         "fix: ask its owner to chmod 600 it, or point RAY_AUTH_TOKEN_PATH at a private copy")
    path.chmod(0o600)
    return (f"the Ray auth token {path} was readable by other users (mode {mode:o}); it is now 600. Anyone who "
            "read it can submit jobs: regenerate the cluster's token if this machine has other users")


def _create_private(path: Path, text: str) -> None:
    """Create `path` (it must not exist) with mode 600 from the first byte; the folder is created 700."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


def _new_token() -> str:
    # the same generator `ray get-auth-token --generate` uses; imported here because it is Ray's private
    # API, which another Ray version may move or drop (then a token from `secrets` does as well)
    try:
        from ray._private.authentication.authentication_token_generator import (
            generate_new_authentication_token,
        )
    except ImportError:
        return secrets.token_hex(32)
    return str(generate_new_authentication_token())


def ensure_token(path: Path | None = None, copy_to: Path | None = NODE_AUTH_DIR) -> tuple[Path, list[str]]:
    """The token file at `path` (default `default_token_path()`), created if missing, mode 600; and a
    private copy in `copy_to` (mode 700 folder, 600 file) for the nodes. Returns (path, what was done)."""
    path = Path(path or default_token_path()).expanduser()
    done: list[str] = []
    if path.is_file() and path.read_text().strip():
        warning = check_token_file(path)
        done.append(f"kept {path}" + (" (made private: it was readable by others)" if warning else ""))
    else:
        path.unlink(missing_ok=True)
        _create_private(path, _new_token())
        done.append(f"created {path} (mode 600)")
    if copy_to is not None:
        folder = Path(copy_to).expanduser()
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        folder.chmod(0o700)
        dst = folder / TOKEN_NAME
        if dst.resolve() != path.resolve():
            write_private(dst, path.read_text())
            done.append(f"copied it to {dst} (mode 600; cluster.yaml mounts {folder} on every node)")
    return path, done


__all__ = ["NODE_AUTH_DIR", "TokenError", "check_token_file", "default_token_path", "ensure_token"]
