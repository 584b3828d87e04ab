"""`stence cluster`: run stence commands on a Ray cluster as Ray Jobs (submit, status, logs, stop, list),
keep the cluster's Ray token private (token), and manage the MLflow server's users (user add, user grant)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from stence.commands._common import RAW

if TYPE_CHECKING:  # the module itself is imported when an action runs (it pulls in Ray)
    from stence.cluster.jobs import Submission

EPILOG = """\
examples:
  stence cluster token                                     # ~/.ray/auth_token (600) + ~/.stence-auth copy
  ray up cluster.yaml && ray dashboard cluster.yaml        # forwards the head's dashboard to :8265
  export RAY_AUTH_MODE=token                               # the cluster runs with token auth
  export MLFLOW_TRACKING_URI=http://mlflow.internal:5000   # passed through to the job
  stence cluster submit --driver-resource driver=1 -- \\
      stence tune --space smoke --num-samples 2 --set train.storage_path=s3://bucket/stence
  stence cluster logs raysubmit_XXXX --follow
  stence cluster list

Secrets never travel with a job (its runtime environment is readable by every token holder through
list_jobs and the dashboard): MLFLOW_TRACKING_USERNAME/PASSWORD and STENCE_SALT are NOT passed through,
and --env refuses secret-looking names. The nodes read their MLflow user from the mounted
~/.stence-auth/mlflow-credentials (see `stence cluster user add --help`); only ingest needs STENCE_SALT.
"""

USER_EPILOG = """\
examples (as the MLflow admin: MLFLOW_TRACKING_USERNAME=admin and MLFLOW_TRACKING_PASSWORD exported, or
~/.mlflow/credentials):
  stence cluster user add ray-cluster --credentials-file ~/.stence-auth/mlflow-credentials
      # the Ray nodes' user: random password, written only to that mode-600 file (mounted on every node)
  stence cluster user add alice --password-file ~/alice.pw     # or: prompted when no file is given
  stence cluster user grant alice --model stence-ecg-encoder --permission READ
  stence cluster user grant ray-cluster --model stence-ecg-encoder --permission EDIT   # may move @champion

A new user sees nothing until granted (the server's default permission is NO_PERMISSIONS); what a user
creates (experiments, registered models) they MANAGE. Moving @champion needs EDIT or MANAGE on the model.
"""


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register `stence cluster` and its sub-commands."""
    p = subparsers.add_parser(
        "cluster",
        help="submit and follow jobs on a Ray cluster",
        description="Run stence commands on a Ray cluster through the Ray Jobs API. The repository is "
        "uploaded as the job's working directory (.gitignore honoured; runs/ and .venv excluded); "
        "MLFLOW_TRACKING_URI is passed through from this shell, credentials and STENCE_SALT are not. Token "
        "authentication: export RAY_AUTH_MODE=token and keep the cluster's token in ~/.ray/auth_token "
        "(mode 600; `stence cluster token` creates it; or RAY_AUTH_TOKEN_PATH / RAY_AUTH_TOKEN).",
        epilog=EPILOG,
        formatter_class=RAW,
    )
    p.set_defaults(func=lambda _args: p.print_help() or 2)
    sub = p.add_subparsers(dest="cluster_command", metavar="ACTION")

    def common(q: argparse.ArgumentParser) -> None:
        q.add_argument(
            "--address",
            help="dashboard URL of the head, e.g. http://HEAD:8265 (default: RAY_API_SERVER_ADDRESS, an "
            "http RAY_ADDRESS, or http://127.0.0.1:8265 as forwarded by `ray dashboard cluster.yaml`)",
        )

    s = sub.add_parser(
        "submit",
        help="submit a command as a Ray Job",
        description="Submit the command after `--` as a Ray Job running this repository's code. Only "
        "MLFLOW_TRACKING_URI and MLFLOW_EXPERIMENT_NAME are passed through; MLFLOW_TRACKING_USERNAME/PASSWORD "
        "and STENCE_SALT are not (a job's environment is readable by every token holder): the nodes have "
        "their own MLflow credentials, and only ingest needs the salt.",
        epilog=EPILOG,
        formatter_class=RAW,
    )
    common(s)
    s.add_argument("--env", nargs="+", action="extend", default=[], metavar="K=V",
                   help="extra environment variables for the job (win over the passed-through ones); names "
                   "that look secret (PASSWORD, TOKEN, SECRET, SALT, ...) are refused")
    s.add_argument("--pip", metavar="FILE|pinned",
                   help="build a virtualenv on each node from a requirements file, or `pinned` for the "
                   "package's own pinned dependencies (default: the nodes' installed Python)")
    s.add_argument("--py-executable", metavar="PATH", help="Python on the nodes to run the job with")
    s.add_argument("--driver-resource", nargs="+", action="extend", default=[], metavar="NAME=AMOUNT",
                   help="custom resources the job's driver needs, e.g. driver=1 to pin it to the head "
                   "of cluster.yaml")
    s.add_argument("--submission-id", help="job id to use (default: generated)")
    mode = s.add_mutually_exclusive_group()
    mode.add_argument("--follow", action="store_true", help="stream the logs until the job ends")
    mode.add_argument("--wait", action="store_true", help="block until the job ends")
    s.add_argument("job_command", nargs=argparse.REMAINDER, metavar="-- COMMAND",
                   help="the command to run, after `--`, e.g. -- stence tune --space smoke")
    s.set_defaults(func=run_submit)

    for name, helptext, fn in (
        ("status", "status of one job", run_status),
        ("logs", "logs of one job", run_logs),
        ("stop", "stop one job", run_stop),
    ):
        q = sub.add_parser(name, help=helptext, description=helptext.capitalize() + ".")
        common(q)
        q.add_argument("job_id", metavar="JOB_ID", help="submission id printed by `stence cluster submit`")
        if name == "logs":
            q.add_argument("--follow", action="store_true", help="keep streaming until the job ends")
        if name == "status":
            q.add_argument("--json", action="store_true", help="print JSON")
        q.set_defaults(func=fn)

    ls = sub.add_parser("list", help="all jobs of the cluster", description="All jobs, newest first.")
    common(ls)
    ls.add_argument("--json", action="store_true", help="print JSON")
    ls.set_defaults(func=run_list)

    tok = sub.add_parser(
        "token", help="create the cluster's Ray auth token privately (mode 600)",
        description="Create ~/.ray/auth_token (or RAY_AUTH_TOKEN_PATH) with mode 600 if it does not exist, "
        "make an existing one private, and copy it into the folder cluster.yaml mounts on every node. "
        "Use it instead of `ray get-auth-token --generate`, which leaves the file readable by every local "
        "user. The token is never printed.",
    )
    tok.add_argument("--path", type=Path, help="token file (default: RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token)")
    tok.add_argument("--copy-to", type=Path, default=Path("~/.stence-auth"),
                     help="folder mounted on the nodes (default ~/.stence-auth)")
    tok.add_argument("--no-copy", action="store_true", help="do not copy it for the nodes")
    tok.set_defaults(func=run_token)

    user = sub.add_parser("user", help="users and permissions of the cluster's MLflow server",
                          description="Add users to the MLflow server of cluster/mlflow/serve.sh and grant "
                          "them permissions, as its admin.", epilog=USER_EPILOG, formatter_class=RAW)
    user.set_defaults(func=lambda _args: user.print_help() or 2)
    usub = user.add_subparsers(dest="user_command", metavar="ACTION")
    add = usub.add_parser("add", help="create a user", description="Create an MLflow user (not an admin).",
                          epilog=USER_EPILOG, formatter_class=RAW)
    add.add_argument("username")
    add.add_argument("--password-file", type=Path,
                     help="read the password from this file (mode 600); without it and without an output "
                     "file below, it is prompted for")
    add.add_argument("--credentials-file", type=Path,
                     help="write the user and its password (generated unless --password-file) as an MLflow "
                     "credentials file, mode 600: e.g. ~/.stence-auth/mlflow-credentials, which cluster.yaml "
                     "links to ~/.mlflow/credentials on every node")
    add.add_argument("--env-file", type=Path,
                     help="the same as MLFLOW_TRACKING_USERNAME=/MLFLOW_TRACKING_PASSWORD= lines, mode 600 "
                     "(for `kubectl create secret generic stence-mlflow-ray --from-env-file FILE`)")
    grant = usub.add_parser("grant", help="grant a permission", description="Grant a user a permission on "
                            "a registered model or an experiment (replaces an earlier grant).",
                            epilog=USER_EPILOG, formatter_class=RAW)
    grant.add_argument("username")
    what = grant.add_mutually_exclusive_group(required=True)
    what.add_argument("--model", help="registered model name, e.g. stence-ecg-encoder")
    what.add_argument("--experiment", help="experiment name")
    grant.add_argument("--permission", default="READ", type=str.upper,
                       choices=("READ", "USE", "EDIT", "MANAGE", "NO_PERMISSIONS"),
                       help="READ: see it; EDIT: also move aliases such as @champion; MANAGE: also delete "
                       "and grant (default READ)")
    for q, fn in ((add, run_user_add), (grant, run_user_grant)):
        q.add_argument("--uri", help="MLflow server (default MLFLOW_TRACKING_URI)")
        q.set_defaults(func=fn)


def _warn(problem: str) -> None:
    print(f"warning: {problem}", file=sys.stderr)


def _fail(e: Exception) -> int:
    print(f"error: {e}", file=sys.stderr)
    return 1


def _format_time(ms: int | None) -> str:
    """Job timestamps are epoch milliseconds."""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ms / 1000)) if ms else "-"


def _print_submitted(job: Submission) -> None:
    """What `submit` says once the job is in (before its logs, with --follow)."""
    print(f"submitted {job.job_id}")
    print(f"  env passed to the job: {', '.join(job.env_passed) if job.env_passed else '(none)'}")
    if job.held_back:
        print("  not passed (the nodes have their own credentials; only ingest needs the salt): "
              f"{', '.join(job.held_back)}")
    print(f"  follow: stence cluster logs {job.job_id} --follow   stop: stence cluster stop {job.job_id}")


def run_submit(args: argparse.Namespace) -> int:
    """Submit the command after `--`; with --wait/--follow the exit code says whether it succeeded."""
    # imported here, not at the top: it pulls in Ray, and `stence --help` imports every command module
    from stence.cluster import jobs

    command = list(args.job_command)
    if command and command[0] == "--":
        command = command[1:]
    try:
        job = jobs.submit_job(
            command, address=args.address, env=args.env, pip=args.pip, py_executable=args.py_executable,
            driver_resources=args.driver_resource, submission_id=args.submission_id, follow=args.follow,
            wait=args.wait, warn=_warn, on_submitted=_print_submitted, out=sys.stdout,
        )
    except (RuntimeError, ValueError, OSError) as e:  # SubmitError, TokenError, the job server's refusal
        return _fail(e)
    if job.status is None:
        return 0
    print(f"job {job.job_id}: {job.status}")
    return 0 if job.status == "SUCCEEDED" else 1


def run_status(args: argparse.Namespace) -> int:
    """Print one job's status (and message)."""
    # imported here, not at the top: it pulls in Ray, and `stence --help` imports every command module
    from stence.cluster import jobs

    try:
        summary = jobs.job_status(args.job_id, address=args.address, warn=_warn)
    except RuntimeError as e:  # SubmitError, TokenError, or the job server's
        return _fail(e)
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"{summary['submission_id']}: {summary['status']}  {summary['message'] or ''}")
        print(f"  started {_format_time(summary['start_time'])}  ended {_format_time(summary['end_time'])}")
        print(f"  entrypoint: {summary['entrypoint']}")
    return 0


def run_logs(args: argparse.Namespace) -> int:
    """Print (or stream) one job's logs."""
    # imported here, not at the top: it pulls in Ray, and `stence --help` imports every command module
    from stence.cluster import jobs

    try:
        logs = jobs.job_logs(args.job_id, address=args.address, follow=args.follow, warn=_warn, out=sys.stdout)
    except RuntimeError as e:  # SubmitError, TokenError, or the job server's
        return _fail(e)
    if args.follow:
        print(f"job {args.job_id}: {logs.status}", file=sys.stderr)
    else:
        sys.stdout.write(logs.text)
    return 0


def run_stop(args: argparse.Namespace) -> int:
    """Ask the cluster to stop one job."""
    # imported here, not at the top: it pulls in Ray, and `stence --help` imports every command module
    from stence.cluster import jobs

    try:
        stopped = jobs.stop_job(args.job_id, address=args.address, warn=_warn)
    except RuntimeError as e:  # SubmitError, TokenError, or the job server's
        return _fail(e)
    print(f"{args.job_id}: {'stop requested' if stopped else 'was not running'}")
    return 0


def run_list(args: argparse.Namespace) -> int:
    """List the cluster's jobs, newest first."""
    # imported here, not at the top: it pulls in Ray, and `stence --help` imports every command module
    from stence.cluster import jobs

    try:
        rows = jobs.list_jobs(address=args.address, warn=_warn)
    except RuntimeError as e:  # SubmitError, TokenError, or the job server's
        return _fail(e)
    if args.json:
        print(json.dumps(rows))
        return 0
    for r in rows:
        lines = (r["entrypoint"] or "").splitlines() or [""]
        entry = lines[0][:90] + (" ..." if len(lines) > 1 or len(lines[0]) > 90 else "")
        print(f"{r['submission_id'] or '-':<32} {r['status']:<10} {_format_time(r['start_time'])}  {entry}")
    if not rows:
        print("no jobs")
    return 0


def run_token(args: argparse.Namespace) -> int:
    """Create or tighten the Ray auth token file and copy it for the nodes; never print the token."""
    # imported here, not at the top: stence.cluster stays unloaded for `stence --help`, which imports every
    # command module
    from stence.cluster import ray_token

    try:
        _, done = ray_token.ensure_token(args.path, None if args.no_copy else args.copy_to)
    except (RuntimeError, OSError) as e:  # TokenError, or the file system's
        return _fail(e)
    for line in done:
        print(line)
    print("clients: export RAY_AUTH_MODE=token (the token is read from that file, never printed)")
    return 0


def run_user_add(args: argparse.Namespace) -> int:
    """Create an MLflow user (as the admin); with --credentials-file, its credentials go only to that file."""
    # imported here, not at the top: it pulls in MLflow, and `stence --help` imports every command module
    from stence.cluster import users

    def written(kind: str, path: Path) -> None:
        if kind == "credentials":
            print(f"wrote {path} (mode 600): MLflow reads it as ~/.mlflow/credentials where {args.username} runs")
        else:
            print(f"wrote {path} (mode 600)")

    try:
        user = users.create_user(args.username, uri=args.uri, password_file=args.password_file,
                                 credentials_file=args.credentials_file, env_file=args.env_file,
                                 on_written=written)
    except (users.UserAdminError, OSError) as e:  # UserAdminError carries the server's refusals too
        return _fail(e)
    print(f"created MLflow user {user.username!r} on {user.uri}; it sees nothing until granted "
          f"(stence cluster user grant {user.username} --model NAME --permission READ)")
    return 0


def run_user_grant(args: argparse.Namespace) -> int:
    """Grant a user a permission on a registered model or an experiment (as the admin)."""
    # imported here, not at the top: it pulls in MLflow, and `stence --help` imports every command module
    from stence.cluster import users

    try:
        what = users.grant_permission(args.username, args.permission, uri=args.uri, model=args.model,
                                      experiment=args.experiment)
    except users.UserAdminError as e:  # UserAdminError carries the server's refusals too
        return _fail(e)
    print(f"granted {args.username!r} {what}")
    return 0
