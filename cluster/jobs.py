"""The job actions of `stence cluster`: submit, status, logs, stop and list, one function each.

Each connects to the cluster's job server (`connect`: the client-side token checks first), does its action
and returns the result. Failures raise SubmitError or TokenError (both RuntimeErrors) with what to do, the
job server's own RuntimeError, and for bad local input of `submit_job` an OSError (requirements file) or
a ValueError (resource amount). What has to be shown while an action is under way goes to the caller's
callbacks: `warn` gets each client-side warning before the connection is made, `on_submitted` the
submitted job before its logs stream, and `out` the streamed logs.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TextIO

from stence.cluster import submit as sj

Warn = Callable[[str], None]


@dataclass(frozen=True)
class Submission:
    """A submitted job: its id, the names of the variables sent with it, those set here but held back
    (secrets), and its final status when it was followed or waited for (else None)."""

    job_id: str
    env_passed: list[str]
    held_back: list[str]
    status: str | None = None


@dataclass(frozen=True)
class JobLogs:
    """A job's logs so far (`text`), or, when they were streamed until the job ended, its final `status`."""

    text: str | None = None
    status: str | None = None


def connect(address: str | None, *, warn: Warn) -> Any:
    """A JobSubmissionClient for `address`, after passing each missing token-auth setting to `warn` and
    making a token file that others can read private (also warned; TokenError if it is not ours)."""
    for problem in [*sj.token_file_warnings(), *sj.auth_problems()]:
        warn(problem)
    return sj.make_client(address)


def pip_requirements(pip: str | None) -> list[str] | None:
    """`--pip`: `pinned` for the package's own pinned dependencies, else a requirements file; None: none."""
    if pip == "pinned":
        return sj.pinned_requirements()
    if pip:
        return sj.read_requirements(pip)
    return None


def submit_job(
    command: Sequence[str],
    *,
    address: str | None = None,
    env: Sequence[str] = (),
    pip: str | None = None,
    py_executable: str | None = None,
    driver_resources: Sequence[str] = (),
    submission_id: str | None = None,
    follow: bool = False,
    wait: bool = False,
    warn: Warn,
    on_submitted: Callable[[Submission], None] | None = None,
    out: TextIO | None = None,
) -> Submission:
    """Submit `command` as a Ray Job running this repository's code (`stence cluster submit`).

    `env` are NAME=VALUE pairs for the job (no secret-looking names), `driver_resources` NAME=AMOUNT
    pairs for its driver. The input is checked before any connection is made. `on_submitted` gets the
    submitted job; then with `follow` its logs stream to `out` (default stdout) until it ends, with
    `wait` this blocks until it ends, and the returned Submission carries the final status."""
    sj.build_entrypoint(command)  # nothing to run is an error before any connection is made
    requirements = pip_requirements(pip)
    runtime_env = sj.build_runtime_env(
        extra_env=sj.parse_env_pairs(env), pip=requirements, py_executable=py_executable
    )
    resources = {k: float(v) for k, v in sj.parse_env_pairs(driver_resources, "--driver-resource").items()}
    client = connect(address, warn=warn)
    job_id = sj.submit(client, command, runtime_env, submission_id=submission_id, entrypoint_resources=resources)
    submitted = Submission(job_id, sorted(runtime_env["env_vars"]), sj.held_back())
    if on_submitted is not None:
        on_submitted(submitted)
    if follow:
        status = sj.follow_logs(client, job_id, sys.stdout if out is None else out)
    elif wait:
        status = sj.wait(client, job_id)
    else:
        return submitted
    return dataclasses.replace(submitted, status=status)


def job_status(job_id: str, *, address: str | None = None, warn: Warn) -> dict[str, Any]:
    """Status, message, entrypoint and times (epoch ms) of one job (`stence cluster status`)."""
    return sj.job_summary(connect(address, warn=warn), job_id)


def job_logs(job_id: str, *, address: str | None = None, follow: bool = False, warn: Warn,
             out: TextIO | None = None) -> JobLogs:
    """One job's logs so far; with `follow`, streamed to `out` (default stdout) until the job ends, and
    its final status returned instead (`stence cluster logs`)."""
    client = connect(address, warn=warn)
    if follow:
        return JobLogs(status=sj.follow_logs(client, job_id, sys.stdout if out is None else out))
    return JobLogs(text=client.get_job_logs(job_id))


def stop_job(job_id: str, *, address: str | None = None, warn: Warn) -> bool:
    """Ask the cluster to stop one job; False if it was not running (`stence cluster stop`)."""
    return bool(connect(address, warn=warn).stop_job(job_id))


def list_jobs(*, address: str | None = None, warn: Warn) -> list[dict[str, Any]]:
    """All jobs the cluster knows, newest first (`stence cluster list`)."""
    return sj.list_summaries(connect(address, warn=warn))


__all__ = ["JobLogs", "Submission", "connect", "job_logs", "job_status", "list_jobs", "pip_requirements",
           "stop_job", "submit_job"]
