"""Submit `stence` commands to a running Ray cluster as Ray Jobs, and follow them.

The job runs the code in this repository (uploaded as the job's `working_dir`, `.gitignore` honoured),
with the MLflow tracking URI passed through from the submitting shell, so a sweep started here logs to
the cluster's MLflow server. Secrets are never part of a job: a job's runtime environment is readable by
every holder of the cluster's token (`list_jobs()`, the dashboard), so the MLflow credentials come from
the nodes themselves (a mounted MLflow credentials file, see cluster.yaml) and the pseudonymisation
secret stays where ingest runs (no stage after ingest needs it). Clusters started with
`RAY_AUTH_MODE=token` (the platform's default) need the same variable and the cluster's token on the
client side; see `auth_problems` and cluster/ray_token.py.
"""

from __future__ import annotations

import asyncio
import os
import re
import shlex
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO

from ray.job_submission import JobSubmissionClient

from stence.cluster.ray_token import check_token_file, default_token_path

try:
    import tomllib
except ImportError:  # Python 3.10 (the standard library has it from 3.11): `--pip pinned` then refuses
    tomllib = None  # type: ignore[assignment]

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_ADDRESS = "http://127.0.0.1:8265"  # `ray dashboard cluster.yaml` forwards the head's port here

# Variables copied from the submitting environment into the job (and so into every Ray worker). Nothing
# secret: the job's runtime environment is shown to every token holder by `list_jobs()`.
PASSTHROUGH_ENV: tuple[str, ...] = (
    "MLFLOW_TRACKING_URI",
    "MLFLOW_EXPERIMENT_NAME",
)
# Set in a submitting shell, but never sent with a job. The MLflow user comes with its password from the
# nodes' credentials file (a username from the job would pair with the wrong password); the salt is only
# needed by ingest, which runs at the site, not on the cluster.
NOT_FORWARDED: tuple[str, ...] = (
    "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_TOKEN",
    "STENCE_SALT",
)
# `--env` refuses names like these: their values would be readable through the Jobs API.
SECRET_NAME = re.compile(r"PASSWORD|PASSWD|SECRET|TOKEN|SALT|CREDENTIAL|API_KEY|PRIVATE_KEY", re.I)

# Never uploaded, on top of what .gitignore already keeps out (runs, checkpoints, local MLflow stores).
DEFAULT_EXCLUDES: tuple[str, ...] = (
    "runs/",
    ".venv/",
    ".git/",
    "mlruns/",
    "mlartifacts/",
    "mlflow.db",
    "__pycache__/",
    "*.pyc",
    "bench/results/",
    ".pytest_cache/",
    ".ruff_cache/",
    ".env",  # local secrets some tools keep next to the code
    "*.env",
)

TERMINAL_STATES = frozenset({"SUCCEEDED", "FAILED", "STOPPED"})


class SubmitError(RuntimeError):
    """The job could not be submitted or followed; the message says what to do."""


def secret_env_names(names: Iterable[str]) -> list[str]:
    """The names that must not travel in a job's runtime environment (see NOT_FORWARDED, SECRET_NAME)."""
    return sorted(n for n in names if n in NOT_FORWARDED or SECRET_NAME.search(n))


def held_back(environ: Mapping[str, str] | None = None) -> list[str]:
    """NOT_FORWARDED variables set in `environ` (default: this process's): what submit leaves behind."""
    env = os.environ if environ is None else environ
    return [k for k in NOT_FORWARDED if env.get(k)]


def parse_env_pairs(pairs: Iterable[str], flag: str = "--env") -> dict[str, str]:
    """["A=1", "B=x=y"] -> {"A": "1", "B": "x=y"}; a pair without "=" is an error naming `flag`."""
    out: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise SubmitError(f"{flag} {pair!r} is not of the form NAME=VALUE")
        out[key.strip()] = value
    return out


def pinned_requirements(pyproject: Path = REPO_ROOT / "pyproject.toml") -> list[str]:
    """The package's own pinned dependency list, for a `pip` runtime environment."""
    if tomllib is None:
        raise SubmitError("--pip pinned needs Python >= 3.11 (tomllib); pass a requirements file")
    data = tomllib.loads(pyproject.read_text())
    return list(data["project"]["dependencies"])


def read_requirements(path: str | Path) -> list[str]:
    """Non-empty, non-comment lines of a requirements file."""
    lines = [line.split("#", 1)[0].strip() for line in Path(path).read_text().splitlines()]
    return [line for line in lines if line]


def build_runtime_env(
    working_dir: str | Path = REPO_ROOT,
    *,
    environ: Mapping[str, str] | None = None,
    extra_env: Mapping[str, str] | None = None,
    pip: Sequence[str] | None = None,
    py_executable: str | None = None,
    excludes: Sequence[str] = DEFAULT_EXCLUDES,
) -> dict[str, Any]:
    """The job's runtime environment: repo as working_dir, pass-through and extra env vars, pip or python.

    `environ` is where pass-through variables are read from (default: this process's environment);
    `extra_env` (from `--env K=V`) wins over them, but may not carry a secret (a name like
    MLFLOW_TRACKING_PASSWORD or STENCE_SALT): the runtime environment is readable by every token holder,
    so secrets come from the nodes instead. `pip` and `py_executable` are mutually exclusive:
    either Ray builds a virtualenv with the pinned packages on each node, or it uses a Python that is
    already installed there (the cluster image installs the package in its setup commands).
    """
    if pip and py_executable:
        raise SubmitError("use either a pip requirement list or --py-executable, not both")
    secret = secret_env_names(extra_env or {})
    if secret:
        raise SubmitError(
            f"--env {', '.join(secret)}: a job's environment is readable by everyone holding the cluster's "
            "token (list_jobs, the dashboard); give the nodes their credentials instead (README, 'Run on a "
            "cluster': ~/.stence-auth/mlflow-credentials) and keep STENCE_SALT at the site (only ingest uses it)"
        )
    source = os.environ if environ is None else environ
    env_vars = {k: source[k] for k in PASSTHROUGH_ENV if source.get(k)}
    env_vars.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    env_vars.update(dict(extra_env or {}))
    runtime_env: dict[str, Any] = {
        "working_dir": str(working_dir),
        "excludes": list(excludes),
        "env_vars": env_vars,
    }
    if pip:
        runtime_env["pip"] = {"packages": list(pip), "pip_check": False}
    if py_executable:
        runtime_env["py_executable"] = py_executable
    return runtime_env


def build_entrypoint(command: Sequence[str], py_executable: str | None = None) -> str:
    """Shell-quoted entrypoint; a leading `stence` runs as `python -m stence.cli` from the uploaded code.

    This way the job runs the submitted version of the package whether or not the cluster's Python
    has the `stence` console script, and with the runtime environment's interpreter.
    """
    argv = list(command)
    if not argv:
        raise SubmitError("nothing to run: give the command after `--`, e.g. -- stence tune --space smoke")
    if argv[0] == "stence":
        argv = [py_executable or "python", "-m", "stence.cli", *argv[1:]]
    return shlex.join(argv)


def resolve_address(address: str | None, environ: Mapping[str, str] | None = None) -> str:
    """--address, else RAY_API_SERVER_ADDRESS, else an http(s) RAY_ADDRESS, else the forwarded port."""
    if address:
        if not address.startswith(("http://", "https://")):
            raise SubmitError(f"--address {address!r} must be the dashboard URL, e.g. http://HEAD:8265")
        return address.rstrip("/")
    env = os.environ if environ is None else environ
    for candidate in (env.get("RAY_API_SERVER_ADDRESS"), env.get("RAY_ADDRESS")):
        if candidate and candidate.startswith(("http://", "https://")):
            return candidate.rstrip("/")
    return DEFAULT_ADDRESS


def auth_problems(environ: Mapping[str, str] | None = None) -> list[str]:
    """What is missing on the client for a token-authenticated cluster (empty list: nothing)."""
    env = os.environ if environ is None else environ
    problems = []
    if env.get("RAY_AUTH_MODE", "").lower() != "token":
        problems.append(
            "RAY_AUTH_MODE is not 'token': a cluster started with token authentication (the platform's "
            "default) answers 401; export RAY_AUTH_MODE=token"
        )
    has_token = bool(env.get("RAY_AUTH_TOKEN")) or (
        bool(env.get("RAY_AUTH_TOKEN_PATH")) and Path(env["RAY_AUTH_TOKEN_PATH"]).is_file()
    )
    if not has_token and not (Path.home() / ".ray" / "auth_token").is_file():
        problems.append(
            "no Ray auth token on this machine: copy the cluster's token to ~/.ray/auth_token, or set "
            "RAY_AUTH_TOKEN_PATH or RAY_AUTH_TOKEN"
        )
    return problems


def token_file_warnings(environ: Mapping[str, str] | None = None) -> list[str]:
    """Make the client's token file private if others can read it (warning returned), or refuse one we
    do not own (TokenError); nothing to do when the token comes in RAY_AUTH_TOKEN or there is no file."""
    env = os.environ if environ is None else environ
    path = default_token_path(env)
    if env.get("RAY_AUTH_TOKEN") or not path.is_file():
        return []
    warning = check_token_file(path)
    return [warning] if warning else []


def make_client(address: str | None = None) -> Any:
    """A `JobSubmissionClient` for the dashboard at `address`, with an actionable error if unreachable."""
    url = resolve_address(address)
    try:
        return JobSubmissionClient(url)
    except Exception as e:  # connection refused, 401/403 from token auth, version mismatch
        hints = auth_problems()
        hint = ("; " + "; ".join(hints)) if hints else ""
        raise SubmitError(
            f"cannot reach the Ray job server at {url}: {e}. Is the cluster up, and is the dashboard "
            f"port forwarded (`ray dashboard cluster.yaml`)?{hint}"
        ) from e


def submit(
    client: Any,
    command: Sequence[str],
    runtime_env: Mapping[str, Any],
    *,
    submission_id: str | None = None,
    entrypoint_resources: Mapping[str, float] | None = None,
    entrypoint_num_cpus: float | None = None,
    metadata: Mapping[str, str] | None = None,
) -> str:
    """Submit `command` as a Ray Job; returns the submission id.

    `entrypoint_resources={"driver": 1}` pins the job's driver (the Tune driver) to the head node of
    `cluster.yaml`, which is the only node type carrying that custom resource.
    """
    entrypoint = build_entrypoint(command, runtime_env.get("py_executable"))
    return client.submit_job(
        entrypoint=entrypoint,
        runtime_env=dict(runtime_env),
        submission_id=submission_id,
        entrypoint_resources=dict(entrypoint_resources) if entrypoint_resources else None,
        entrypoint_num_cpus=entrypoint_num_cpus,
        metadata=dict(metadata or {}),
    )


def job_summary(client: Any, job_id: str) -> dict[str, Any]:
    """Status, message, entrypoint and times of one job as a plain dict."""
    info = client.get_job_info(job_id)
    return {
        "submission_id": info.submission_id,
        "job_id": info.job_id,
        "status": str(info.status.value if hasattr(info.status, "value") else info.status),
        "message": info.message,
        "entrypoint": info.entrypoint,
        "start_time": info.start_time,
        "end_time": info.end_time,
    }


def list_summaries(client: Any) -> list[dict[str, Any]]:
    """All jobs the cluster knows, newest first."""
    jobs = client.list_jobs()
    rows = [
        {
            "submission_id": j.submission_id,
            "status": str(j.status.value if hasattr(j.status, "value") else j.status),
            "start_time": j.start_time,
            "entrypoint": j.entrypoint,
        }
        for j in jobs
    ]
    return sorted(rows, key=lambda r: r["start_time"] or 0, reverse=True)


def wait(client: Any, job_id: str, timeout_s: float = 3600.0, poll_s: float = 2.0) -> str:
    """Block until the job ends (or `timeout_s` passes); returns the last status."""
    deadline = time.monotonic() + timeout_s
    status = job_summary(client, job_id)["status"]
    while status not in TERMINAL_STATES and time.monotonic() < deadline:
        time.sleep(poll_s)
        status = job_summary(client, job_id)["status"]
    return status


def follow_logs(client: Any, job_id: str, out: TextIO = sys.stdout) -> str:
    """Stream the job's logs until it ends; returns the final status."""

    async def _tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            out.write(chunk)
            out.flush()

    asyncio.run(_tail())
    return wait(client, job_id, timeout_s=60.0, poll_s=1.0)
