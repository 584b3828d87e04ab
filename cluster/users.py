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
import io
import os
import secrets
import stat
from pathlib import Path
from typing import Any

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
    from mlflow.server.auth.client import AuthServiceClient
    from mlflow.utils.credentials import read_mlflow_creds

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
    from stence.tracking.client import tracking_client

    exp = tracking_client(uri).get_experiment_by_name(experiment)
    if exp is None:
        raise UserAdminError(f"no experiment named {experiment!r} on {uri}")
    _set_permission(client, username, "experiment", exp.experiment_id, permission)
    return f"{permission} on experiment {experiment!r} (id {exp.experiment_id})"


def _set_permission(client: Any, username: str, resource_type: str, resource_id: str, permission: str) -> None:
    """Grant, replacing an existing grant (the server has no update call: revoke, then grant again)."""
    from mlflow.exceptions import MlflowException

    try:
        client.grant_user_permission(username, resource_type, resource_id, permission)
    except MlflowException as e:
        if e.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        client.revoke_user_permission(username, resource_type, resource_id)
        client.grant_user_permission(username, resource_type, resource_id, permission)


__all__ = ["PERMISSIONS", "UserAdminError", "add_user", "credentials_text", "env_text", "grant", "new_password",
           "read_password_file", "tracking_uri", "write_private"]
