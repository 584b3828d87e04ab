"""Users and permissions of the cluster's MLflow server (the basic-auth app `cluster/mlflow/serve.sh` starts).

The server is closed by default: a new user sees and changes nothing until granted (default permission
NO_PERMISSIONS), except what they create themselves (MLflow gives the creator MANAGE). Moving
`@champion` needs EDIT (or MANAGE) on the registered model. These helpers run as the admin: MLflow reads
the admin's credentials from MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD or ~/.mlflow/credentials.

A user's password never travels on a command line: it is read from a file or a prompt, or generated
and written only into a mode-600 MLflow credentials file (what the Ray nodes mount, see cluster.yaml).
"""

from __future__ import annotations

import configparser
import getpass
import io
import os
import secrets
import stat
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlflow.exceptions import MlflowException
from mlflow.utils.credentials import read_mlflow_creds

from stence.cluster.private_files import write_private
from stence.tracking.client import tracking_client

PERMISSIONS = ("READ", "USE", "EDIT", "MANAGE", "NO_PERMISSIONS")
MIN_PASSWORD = 12  # MLflow's own minimum


class UserAdminError(RuntimeError):
    """The user or permission could not be created; the message says what to do."""


def tracking_uri(uri: str | None = None) -> str:
    """--uri, else MLFLOW_TRACKING_URI; must be an http(s) server (users live only on a server)."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI", "")
    if not uri.startswith(("http://", "https://")):
        raise UserAdminError("give the MLflow server with --uri or MLFLOW_TRACKING_URI (http://host:5000)")
    return uri.rstrip("/")


def _auth_client(uri: str) -> Any:
    # in here: it imports MLflow's server app (Flask, Starlette: seconds, and a deprecation warning on
    # stderr), which only the admin calls need, not what imports this module for credentials_text
    from mlflow.server.auth.client import AuthServiceClient

    creds = read_mlflow_creds()
    if not (creds.username and creds.password):
        raise UserAdminError("no admin credentials: export MLFLOW_TRACKING_USERNAME=admin and "
                             "MLFLOW_TRACKING_PASSWORD (e.g. `read -rs MLFLOW_TRACKING_PASSWORD; export "
                             "MLFLOW_TRACKING_PASSWORD`), or keep them in ~/.mlflow/credentials")
    return AuthServiceClient(uri)


def new_password() -> str:
    """A random password (32 URL-safe characters)."""
    return secrets.token_urlsafe(24)


def read_password_file(path: str | Path) -> str:
    """First line of a password file that only its owner can read."""
    path = Path(path).expanduser()
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise UserAdminError(f"{path} is readable by others (mode {mode:o}): chmod 600 {path}")
    lines = path.read_text().splitlines()
    password = lines[0].strip() if lines else ""
    if len(password) < MIN_PASSWORD:
        raise UserAdminError(f"the password in {path} is shorter than {MIN_PASSWORD} characters")
    return password


def credentials_text(username: str, password: str) -> str:
    """An MLflow credentials file (what MLflow reads from ~/.mlflow/credentials in every process)."""
    cfg = configparser.ConfigParser(interpolation=None)
    # MLflow reads the file with ConfigParser's default interpolation, where "%" must be doubled
    cfg["mlflow"] = {"mlflow_tracking_username": username.replace("%", "%%"),
                     "mlflow_tracking_password": password.replace("%", "%%")}
    out = io.StringIO()
    cfg.write(out)
    return out.getvalue()


def env_text(username: str, password: str) -> str:
    """The same credentials as environment lines (a Kubernetes Secret from `--from-env-file`)."""
    return f"MLFLOW_TRACKING_USERNAME={username}\nMLFLOW_TRACKING_PASSWORD={password}\n"


def add_user(uri: str, username: str, password: str) -> None:
    """Create `username` (not an admin; sees nothing until granted)."""
    if len(password) < MIN_PASSWORD:
        raise UserAdminError(f"passwords need at least {MIN_PASSWORD} characters")
    _auth_client(uri).create_user(username, password)


def grant(uri: str, username: str, permission: str, *, model: str | None = None,
          experiment: str | None = None) -> str:
    """Give `username` `permission` on a registered model (by name) or an experiment (by name); returns
    what was granted, for the message."""
    permission = permission.upper()
    if permission not in PERMISSIONS:
        raise UserAdminError(f"permission must be one of {', '.join(PERMISSIONS)}")
    if (model is None) == (experiment is None):
        raise UserAdminError("grant on exactly one of --model or --experiment")
    client = _auth_client(uri)
    if model is not None:
        _set_permission(client, username, "registered_model", model, permission)
        return f"{permission} on registered model {model!r}"
    exp = tracking_client(uri).get_experiment_by_name(experiment)
    if exp is None:
        raise UserAdminError(f"no experiment named {experiment!r} on {uri}")
    _set_permission(client, username, "experiment", exp.experiment_id, permission)
    return f"{permission} on experiment {experiment!r} (id {exp.experiment_id})"


def _set_permission(client: Any, username: str, resource_type: str, resource_id: str, permission: str) -> None:
    """Grant, replacing an existing grant (the server has no update call: revoke, then grant again)."""
    try:
        client.grant_user_permission(username, resource_type, resource_id, permission)
    except MlflowException as e:
        if e.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        client.revoke_user_permission(username, resource_type, resource_id)
        client.grant_user_permission(username, resource_type, resource_id, permission)


def prompt_password(username: str) -> str:
    """Ask for `username`'s password twice on the terminal (not echoed); no terminal is an error."""
    if not sys.stdin.isatty():
        raise UserAdminError("no terminal to prompt on: give --password-file or --credentials-file")
    first = getpass.getpass(f"password for {username}: ")
    if first != getpass.getpass("again: "):
        raise UserAdminError("the passwords differ")
    return first


def choose_password(username: str, *, password_file: str | Path | None = None, generate: bool = False,
                    prompt: Callable[[str], str] = prompt_password) -> str:
    """The new user's password: from `password_file`, else generated (`generate`: it goes only into the
    files written for the user), else asked for with `prompt`."""
    if password_file:
        return read_password_file(password_file)
    if generate:
        return new_password()
    return prompt(username)


@dataclass(frozen=True)
class NewUser:
    """A user `create_user` made on the server at `uri`, and the mode-600 files written for it."""

    username: str
    uri: str
    credentials_file: Path | None = None
    env_file: Path | None = None


def create_user(
    username: str,
    *,
    uri: str | None = None,
    password_file: str | Path | None = None,
    credentials_file: str | Path | None = None,
    env_file: str | Path | None = None,
    prompt: Callable[[str], str] = prompt_password,
    on_written: Callable[[str, Path], None] | None = None,
) -> NewUser:
    """`stence cluster user add`: create `username` on the server (`uri`, default MLFLOW_TRACKING_URI) as
    the admin, then write its credentials to `credentials_file` (an MLflow credentials file) and/or
    `env_file` (MLFLOW_TRACKING_USERNAME/PASSWORD lines), both mode 600.

    The password comes from `password_file`, is generated when a file is to be written, or is asked for
    with `prompt`; it is returned nowhere. `on_written(kind, path)` ("credentials" or "env") is called as
    each file is written, so a caller can say so even if a later step fails. Errors, the server's
    included, raise UserAdminError; a file that cannot be read or written raises OSError."""
    try:
        server = tracking_uri(uri)
        password = choose_password(username, password_file=password_file,
                                   generate=bool(credentials_file or env_file), prompt=prompt)
        add_user(server, username, password)
        written: dict[str, Path] = {}
        for kind, path, text in (("credentials", credentials_file, credentials_text),
                                 ("env", env_file, env_text)):
            if path:
                written[kind] = write_private(path, text(username, password))
                if on_written is not None:
                    on_written(kind, written[kind])
    except MlflowException as e:  # the server refused (user exists, not an admin, ...): its message
        raise UserAdminError(str(e)) from e
    return NewUser(username, server, written.get("credentials"), written.get("env"))


def grant_permission(username: str, permission: str, *, uri: str | None = None, model: str | None = None,
                     experiment: str | None = None) -> str:
    """`stence cluster user grant`: `grant` on the server at `uri` (default MLFLOW_TRACKING_URI) as the
    admin; returns what was granted. Errors, the server's included, raise UserAdminError."""
    try:
        return grant(tracking_uri(uri), username, permission, model=model, experiment=experiment)
    except MlflowException as e:
        raise UserAdminError(str(e)) from e


__all__ = ["PERMISSIONS", "NewUser", "UserAdminError", "add_user", "choose_password", "create_user",
           "credentials_text", "env_text", "grant", "grant_permission", "new_password", "prompt_password",
           "read_password_file", "tracking_uri", "write_private"]
