"""`stence cluster`: run stence commands on a Ray cluster as Ray Jobs (submit, status, logs, stop, list)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from stence.commands._common import RAW

EPILOG = """\
examples:
  ray up cluster.yaml && ray dashboard cluster.yaml        # forwards the head's dashboard to :8265
  export RAY_AUTH_MODE=token                               # the cluster runs with token auth
  export MLFLOW_TRACKING_URI=http://mlflow.internal:5000   # passed through to the job
  stence cluster submit --driver-resource driver=1 -- \\
      stence tune --space smoke --num-samples 2 --set train.storage_path=s3://bucket/stence
  stence cluster logs raysubmit_XXXX --follow
  stence cluster list
"""


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register `stence cluster` and its sub-commands."""
    p = subparsers.add_parser(
        "cluster",
        help="submit and follow jobs on a Ray cluster",
        description="Run stence commands on a Ray cluster through the Ray Jobs API. The repository is "
        "uploaded as the job's working directory (.gitignore honoured; runs/ and .venv excluded); "
        "MLFLOW_TRACKING_URI and STENCE_SALT are passed through from this shell. Token "
        "authentication: export RAY_AUTH_MODE=token and keep the cluster's token in ~/.ray/auth_token "
        "(or RAY_AUTH_TOKEN_PATH / RAY_AUTH_TOKEN).",
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
        description="Submit the command after `--` as a Ray Job running this repository's code.",
        epilog=EPILOG,
        formatter_class=RAW,
    )
    common(s)
    s.add_argument("--env", nargs="+", action="extend", default=[], metavar="K=V",
                   help="extra environment variables for the job (win over the passed-through ones)")
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


def _client(args: argparse.Namespace) -> Any:
    """A JobSubmissionClient (imported lazily), after warning about missing token-auth settings."""
    from cluster.submit import auth_problems, make_client

    for problem in auth_problems():
        print(f"warning: {problem}", file=sys.stderr)
    return make_client(args.address)


def _fail(e: Exception) -> int:
    print(f"error: {e}", file=sys.stderr)
    return 1


def run_submit(args: argparse.Namespace) -> int:
    """Submit the command after `--`; with --wait/--follow the exit code says whether it succeeded."""
    from cluster import submit as sj

    command = list(args.job_command)
    if command and command[0] == "--":
        command = command[1:]
    try:
        sj.build_entrypoint(command)  # nothing to run is an error before any connection is made
        pip = None
        if args.pip == "pinned":
            pip = sj.pinned_requirements()
        elif args.pip:
            pip = sj.read_requirements(args.pip)
        runtime_env = sj.build_runtime_env(
            extra_env=sj.parse_env_pairs(args.env), pip=pip, py_executable=args.py_executable
        )
        resources = {k: float(v) for k, v in sj.parse_env_pairs(args.driver_resource, "--driver-resource").items()}
        client = _client(args)
        job_id = sj.submit(
            client, command, runtime_env, submission_id=args.submission_id, entrypoint_resources=resources
        )
    except (RuntimeError, ValueError, OSError) as e:  # SubmitError, or the job server refused the job
        return _fail(e)
    print(f"submitted {job_id}")
    passed = sorted(runtime_env["env_vars"])
    print(f"  env passed to the job: {', '.join(passed) if passed else '(none)'}")
    print(f"  follow: stence cluster logs {job_id} --follow   stop: stence cluster stop {job_id}")
    if args.follow:
        status = sj.follow_logs(client, job_id)
    elif args.wait:
        status = sj.wait(client, job_id)
    else:
        return 0
    print(f"job {job_id}: {status}")
    return 0 if status == "SUCCEEDED" else 1


def run_status(args: argparse.Namespace) -> int:
    """Print one job's status (and message)."""
    from cluster import submit as sj

    try:
        summary = sj.job_summary(_client(args), args.job_id)
    except (sj.SubmitError, RuntimeError) as e:
        return _fail(e)
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"{summary['submission_id']}: {summary['status']}  {summary['message'] or ''}")
        print(f"  started {sj.format_time(summary['start_time'])}  ended {sj.format_time(summary['end_time'])}")
        print(f"  entrypoint: {summary['entrypoint']}")
    return 0


def run_logs(args: argparse.Namespace) -> int:
    """Print (or stream) one job's logs."""
    from cluster import submit as sj

    try:
        client = _client(args)
        if args.follow:
            status = sj.follow_logs(client, args.job_id)
            print(f"job {args.job_id}: {status}", file=sys.stderr)
        else:
            sys.stdout.write(client.get_job_logs(args.job_id))
    except (sj.SubmitError, RuntimeError) as e:
        return _fail(e)
    return 0


def run_stop(args: argparse.Namespace) -> int:
    """Ask the cluster to stop one job."""
    from cluster import submit as sj

    try:
        stopped = _client(args).stop_job(args.job_id)
    except (sj.SubmitError, RuntimeError) as e:
        return _fail(e)
    print(f"{args.job_id}: {'stop requested' if stopped else 'was not running'}")
    return 0


def run_list(args: argparse.Namespace) -> int:
    """List the cluster's jobs, newest first."""
    from cluster import submit as sj

    try:
        rows = sj.list_summaries(_client(args))
    except (sj.SubmitError, RuntimeError) as e:
        return _fail(e)
    if args.json:
        print(json.dumps(rows))
        return 0
    for r in rows:
        lines = (r["entrypoint"] or "").splitlines() or [""]
        entry = lines[0][:90] + (" ..." if len(lines) > 1 or len(lines[0]) > 90 else "")
        print(f"{r['submission_id'] or '-':<32} {r['status']:<10} {sj.format_time(r['start_time'])}  {entry}")
    if not rows:
        print("no jobs")
    return 0
