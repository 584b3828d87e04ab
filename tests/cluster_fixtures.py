"""Real processes for the cluster tests, all on 127.0.0.1: PostgreSQL, the MLflow server started by
cluster/mlflow/serve.sh (users and permissions on, as by default), and a two-node Ray cluster (head + one
`ray start --address` node) with token authentication.

Everything started here is stopped here by process id, also when a test fails. `ray stop` is never
used: it ends every Ray process on the machine, including other people's local clusters.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import requests

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
SERVE_SH = REPO / "cluster" / "mlflow" / "serve.sh"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def tail(path: Path, n: int = 40) -> str:
    """Last `n` lines of a log file (for error messages)."""
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return f"(no log at {path})"


class ProcessDied(RuntimeError):
    """A process a fixture waits for has exited; waiting longer is pointless."""


def wait_until(check: Callable[[], bool], timeout_s: float, what: str, logs: tuple[Path, ...] = ()) -> None:
    """Poll `check` until it is true; on timeout raise with the tails of `logs`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except ProcessDied:
            raise
        except Exception:  # a server that is still starting refuses connections
            pass
        time.sleep(0.5)
    detail = "\n".join(f"--- {p.name}\n{tail(p)}" for p in logs)
    raise RuntimeError(f"timed out after {timeout_s:.0f}s waiting for {what}\n{detail}")


def make_root() -> Path:
    """A short, world-traversable scratch folder (Ray's unix sockets need short paths; postgres must enter)."""
    root = Path(tempfile.mkdtemp(prefix="stc-", dir="/tmp"))
    root.chmod(0o755)
    return root


def stop_process_group(proc: subprocess.Popen | None, grace_s: float = 20.0) -> None:
    """SIGTERM the process group this fixture started (its own session), then SIGKILL it."""
    if proc is None:
        return
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        if proc.poll() is not None:
            break
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=wait_s)
        except subprocess.TimeoutExpired:
            continue
    try:  # children that outlived the leader are still in the group
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _live_followers(pgid: int) -> list[int]:
    """Processes of process group `pgid` other than its leader that have not exited (zombies count as exited)."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == pgid:
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()  # after "(comm)": state ppid pgrp ...
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            out.append(int(entry.name))
    return out


def stop_ray_node(proc: subprocess.Popen, grace_s: float = 20.0) -> None:
    """Stop a `ray start --block` process group for good (a teardown, not a preemption): SIGTERM the group, wait
    until its processes other than the leader (raylet, GCS, dashboard, workers ...) have exited (at most
    `grace_s`), then SIGKILL the group.

    The leader itself is not waited for: on SIGTERM it asks the GCS to drain its node and waits up to
    RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S (30 s) for a drain that a node whose processes are gone never finishes,
    so `stop_process_group` sat out its whole grace time on every node."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and proc.poll() is None and _live_followers(proc.pid):
            time.sleep(0.2)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass


def pids_mentioning(text: str) -> list[int]:
    """Processes whose command line contains `text` (a unique scratch path), excluding this one."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline:
            out.append(int(entry.name))
    return out


# ---------------------------------------------------------------------------------------------------
# PostgreSQL


def pg_bin(name: str) -> str:
    """Path of a PostgreSQL server binary (Debian keeps them in /usr/lib/postgresql/<v>/bin)."""
    found = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"), key=lambda p: int(p.parts[-3]))
    if found:
        return str(found[-1])
    which = shutil.which(name)
    if which:
        return which
    raise FileNotFoundError(f"{name} not found: install PostgreSQL (bash cluster/ci_install.sh)")


def postgres_available() -> bool:
    """Whether a PostgreSQL server can be started here."""
    try:
        pg_bin("initdb")
        pg_bin("pg_ctl")
    except FileNotFoundError:
        return False
    return os.geteuid() != 0 or shutil.which("runuser") is not None


class Postgres:
    """A throwaway PostgreSQL cluster in `root/pg`, listening on 127.0.0.1 with password auth.

    As root (CI), the server runs as the `postgres` system user through `runuser`: PostgreSQL refuses
    to run as root.
    """

    def __init__(self, root: Path, user: str = "stence") -> None:
        self.dir = root / "pg"
        self.data = self.dir / "data"
        self.log = self.dir / "postgres.log"
        self.port = free_port()
        self.user = user
        self.password = secrets.token_hex(12)
        self.started = False

    def _cmd(self, *argv: str) -> list[str]:
        if os.geteuid() == 0:
            return ["runuser", "-u", "postgres", "--", *argv]
        return list(argv)

    def _own(self, path: Path) -> None:
        if os.geteuid() == 0:
            shutil.chown(path, "postgres", "postgres")

    def uri(self, database: str, with_password: bool = True) -> str:
        """SQLAlchemy URI of one database of this server (psycopg2 named: bare postgresql:// means psycopg 3);
        without the password, libpq takes it from PGPASSWORD / a password file."""
        secret = f":{self.password}" if with_password else ""
        return f"postgresql+psycopg2://{self.user}{secret}@127.0.0.1:{self.port}/{database}"

    def password_file(self, path: Path) -> Path:
        """The password in a mode-600 file (what serve.sh's MLFLOW_DB_PASSWORD_FILE takes)."""
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(self.password + "\n")
        return path

    def start(self, databases: tuple[str, ...] = ("mlflow",)) -> None:
        """initdb, start, and create `databases` owned by the user."""
        self.dir.mkdir(parents=True)
        self._own(self.dir)
        pwfile = self.dir / "pwfile"
        pwfile.write_text(self.password + "\n")
        pwfile.chmod(0o600)
        self._own(pwfile)
        subprocess.run(
            self._cmd(pg_bin("initdb"), "-D", str(self.data), "-U", self.user, f"--pwfile={pwfile}",
                      "--auth-local=trust", "--auth-host=scram-sha-256", "-E", "UTF8"),
            check=True, capture_output=True, text=True,
        )
        pwfile.unlink()
        opts = f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.dir}"
        proc = subprocess.run(
            self._cmd(pg_bin("pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-o", opts, "-w", "-t", "60",
                      "start"),
            capture_output=True, text=True,
        )
        self.started = True  # pg_ctl may have started it even when waiting failed
        if proc.returncode != 0:
            raise RuntimeError(f"pg_ctl start failed: {proc.stderr}\n{tail(self.log)}")
        import psycopg2

        conn = psycopg2.connect(host="127.0.0.1", port=self.port, user=self.user, password=self.password,
                                dbname="postgres")
        conn.autocommit = True
        with conn.cursor() as cur:
            for db in databases:
                cur.execute(f'CREATE DATABASE "{db}"')
        conn.close()

    def query(self, database: str, sql: str, params: tuple = ()) -> list[tuple]:
        """Run one SQL statement and return its rows."""
        import psycopg2

        conn = psycopg2.connect(host="127.0.0.1", port=self.port, user=self.user, password=self.password,
                                dbname=database)
        try:
            with conn.cursor() as cur:
                cur.execute(sql, params)
                return list(cur.fetchall())
        finally:
            conn.close()

    def stop(self) -> None:
        """pg_ctl stop (fast); kill the postmaster by its pid file if that fails."""
        if not self.started:
            return
        self.started = False
        pidfile = self.data / "postmaster.pid"
        if not pidfile.exists():
            return
        done = subprocess.run(
            self._cmd(pg_bin("pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "-t", "30", "stop"),
            capture_output=True, text=True,
        )
        if done.returncode != 0 and pidfile.exists():
            try:
                os.kill(int(pidfile.read_text().split()[0]), signal.SIGKILL)
            except (ValueError, ProcessLookupError):
                pass


# ---------------------------------------------------------------------------------------------------
# MLflow


ADMIN = ("admin", "admin-" + secrets.token_hex(8))  # the first admin serve.sh creates (>= 12 characters)
_AS_ADMIN = object()


class MlflowServer:
    """`cluster/mlflow/serve.sh` with a PostgreSQL backend, a proxied artifact folder and, as by default,
    users and permissions (their own database `auth_uri`; the first admin is `ADMIN`)."""

    def __init__(self, root: Path, backend_uri: str, auth_uri: str, name: str = "mlflow", **env: str) -> None:
        self.root = root
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.artifacts = root / f"{name}-artifacts"
        self.log = root / f"{name}.log"
        self.admin = ADMIN
        self.env = {
            "MLFLOW_BACKEND_STORE_URI": backend_uri,
            "MLFLOW_AUTH_DATABASE_URI": auth_uri,
            "MLFLOW_AUTH_ADMIN_PASSWORD": ADMIN[1],
            "MLFLOW_ARTIFACTS_DESTINATION": str(self.artifacts),
            "MLFLOW_HOST": "127.0.0.1",
            "MLFLOW_PORT": str(self.port),
            "MLFLOW_WORKERS": "1",
            "MLFLOW_BIN": str(VENV_BIN / "mlflow"),
            "MLFLOW_STATE_DIR": str(root / f"{name}-state"),
            # a good password check is cached: without it each request costs a PBKDF2 hash (~0.5 s on 2 cores)
            "MLFLOW_AUTH_CACHE_TTL_S": "300",
            **env,
        }
        self.proc: subprocess.Popen | None = None

    def start(self, timeout_s: float = 120.0) -> None:
        """Start serve.sh and wait for /health."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PG"))}
        env.update({**self.env, "PATH": f"{VENV_BIN}:{os.environ.get('PATH', '')}"})
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(["bash", str(SERVE_SH)], env=env, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)

        def healthy() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise ProcessDied(f"mlflow server exited ({self.proc.returncode}):\n{tail(self.log)}")
            return requests.get(f"{self.url}/health", timeout=2).status_code == 200

        wait_until(healthy, timeout_s, "the MLflow server", (self.log,))

    def api(self, method: str, path: str, auth: Any = _AS_ADMIN, version: str = "2.0",
            **kwargs: Any) -> requests.Response:
        """Call the MLflow REST API (`path` after /api/VERSION/mlflow/) as the admin, as `auth=(user,
        password)`, or anonymously with `auth=None`."""
        auth = self.admin if auth is _AS_ADMIN else auth
        return requests.request(method, f"{self.url}/api/{version}/mlflow/{path}", auth=auth, timeout=60, **kwargs)

    def client_env(self, user: tuple[str, str] | None = None) -> dict[str, str]:
        """Variables of a shell using this server as `user` (default: the admin)."""
        username, password = user or self.admin
        return {"MLFLOW_TRACKING_URI": self.url, "MLFLOW_TRACKING_USERNAME": username,
                "MLFLOW_TRACKING_PASSWORD": password}

    def add_user(self, username: str, password: str, *grants: tuple[str, str, str]) -> tuple[str, str]:
        """Create a user as the admin, with `(resource_type, resource_id, permission)` grants."""
        r = self.api("POST", "users/create", json={"username": username, "password": password})
        assert r.status_code == 200, r.text
        for resource_type, resource_id, permission in grants:
            r = self.api("POST", "users/permissions/grant", version="3.0",
                         json={"username": username, "resource_type": resource_type, "resource_id": resource_id,
                               "permission": permission})
            assert r.status_code == 200, r.text
        return username, password

    def stop(self) -> None:
        """Stop the server's process group."""
        stop_process_group(self.proc, grace_s=10.0)
        self.proc = None


def write_mlflow_credentials(home: Path, user: tuple[str, str]) -> Path:
    """`home`/.mlflow/credentials (mode 600) for `user`: what cluster.yaml gives every node."""
    from stence.cluster.users import credentials_text, write_private

    return write_private(home / ".mlflow" / "credentials", credentials_text(*user))


# ---------------------------------------------------------------------------------------------------
# Ray


class RayCluster:
    """A Ray head and extra nodes as separate `ray start --block` processes, with token auth on.

    The dashboard (and its Jobs API) binds to 127.0.0.1 on a free port; every port the nodes open by
    default at a fixed number is given a free one, so other local Ray instances are not disturbed.
    Every node has its own temp dir, as separate machines do: nodes sharing one session folder share its
    runtime_resources, and a node that first meets a job's working_dir deletes and unpacks it again there,
    under the feet of the job's driver on another node (its cwd is gone).
    """

    def __init__(self, root: Path, base_env: dict[str, str] | None = None,
                 node_env: dict[str, str] | None = None) -> None:
        self.root = root
        self.temp_dir = root / "ray"
        self.token_path = root / "ray_auth_token"
        fd = os.open(self.token_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # private from the first byte
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
        self.gcs_port = free_port()
        self.dashboard_port = free_port()
        self.base_env = dict(base_env or {})
        self.node_env = dict(node_env or {})  # only the nodes' own processes (e.g. their HOME)
        self.procs: dict[str, subprocess.Popen] = {}

    @property
    def address(self) -> str:
        """GCS address for `ray start --address` / `ray.init(address=...)`."""
        return f"127.0.0.1:{self.gcs_port}"

    @property
    def dashboard_url(self) -> str:
        """Dashboard / Jobs API URL (what `stence cluster --address` takes)."""
        return f"http://127.0.0.1:{self.dashboard_port}"

    def node_temp_dir(self, name: str) -> Path:
        """Ray temp dir of one node (the head's is `temp_dir`; the others' names start with it too)."""
        return self.temp_dir if name == "head" else Path(f"{self.temp_dir}-{name}")

    def log(self, name: str) -> Path:
        """Log of one node's `ray start` process."""
        return self.root / f"ray-{name}.log"

    def client_env(self) -> dict[str, str]:
        """Environment of a process that talks to this cluster (CLI, job clients): token auth on."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        env.update(self.base_env)
        env.update({
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": str(self.token_path),
            "RAY_USAGE_STATS_ENABLED": "0",
            "PATH": f"{VENV_BIN}:{os.environ.get('PATH', '')}",
        })
        return env

    def _start(self, name: str, argv: list[str]) -> None:
        cmd = [
            str(VENV_BIN / "ray"), "start", "--block", "--node-ip-address=127.0.0.1", f"--node-name={name}",
            f"--dashboard-agent-listen-port={free_port()}", "--disable-usage-stats",
            "--object-store-memory=150000000", *argv,
        ]
        with open(self.log(name), "w") as log:
            # a node holds no user's MLflow variables and no site salt (conftest puts one in this process)
            node_env = {k: v for k, v in self.client_env().items()
                        if not k.startswith("MLFLOW_TRACKING_") and k != "STENCE_SALT"}
            self.procs[name] = subprocess.Popen(cmd, env={**node_env, **self.node_env}, stdout=log,
                                                stderr=subprocess.STDOUT, start_new_session=True, cwd=self.root)

    def start_head(self, num_cpus: int, resources: dict[str, float]) -> None:
        """Head node: GCS, dashboard on 127.0.0.1, Jobs API."""
        self._start("head", [
            "--head", f"--port={self.gcs_port}", f"--temp-dir={self.temp_dir}", "--include-dashboard=true",
            "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}",
            f"--ray-client-server-port={free_port()}", f"--num-cpus={num_cpus}", f"--resources={json.dumps(resources)}",
        ])
        self.wait_nodes({"head"}, timeout_s=150.0)

    def add_node(self, name: str, num_cpus: int, resources: dict[str, float]) -> None:
        """Another node joining the head (same machine, its own raylet and resources)."""
        self._start(name, [
            f"--address={self.address}", f"--temp-dir={self.node_temp_dir(name)}", f"--num-cpus={num_cpus}",
            f"--resources={json.dumps(resources)}",
        ])
        self.wait_nodes({"head", name}, timeout_s=120.0)

    def nodes(self) -> list[dict[str, Any]]:
        """Nodes as the State API sees them (through the authenticated dashboard)."""
        r = requests.get(f"{self.dashboard_url}/api/v0/nodes", params={"detail": "1", "limit": "100"},
                         headers={"Authorization": f"Bearer {self.token_path.read_text().strip()}"}, timeout=10)
        r.raise_for_status()
        return list(r.json()["data"]["result"]["result"])

    def actors(self, state: str | None = "ALIVE") -> list[dict[str, Any]]:
        """Actors in `state` (None: every state, DEAD ones too) with class name and node id, as the State
        API sees them."""
        params = {"detail": "1", "limit": "10000"}
        if state:
            params.update({"filter_keys": "state", "filter_predicates": "=", "filter_values": state})
        r = requests.get(f"{self.dashboard_url}/api/v0/actors", params=params,
                         headers={"Authorization": f"Bearer {self.token_path.read_text().strip()}"}, timeout=10)
        r.raise_for_status()
        return list(r.json()["data"]["result"]["result"])

    def job_status(self, submission_id: str) -> str:
        """A job's status (PENDING, RUNNING, SUCCEEDED ...) from the Jobs API, in this process: what the tests
        poll while they wait (each `stence cluster status` is a Python process start, ~2 CPU-seconds taken from
        the job on a 2-core machine); they check the CLI's own answer once the wait is over."""
        r = requests.get(f"{self.dashboard_url}/api/jobs/{submission_id}",
                         headers={"Authorization": f"Bearer {self.token_path.read_text().strip()}"}, timeout=30)
        r.raise_for_status()
        return str(r.json()["status"])

    def alive(self) -> dict[str, dict[str, Any]]:
        """ALIVE nodes by node name."""
        return {n["node_name"]: n for n in self.nodes() if n.get("state") == "ALIVE"}

    def wait_nodes(self, names: set[str], timeout_s: float) -> None:
        """Wait until exactly these node names are alive."""
        def ok() -> bool:
            for name, proc in self.procs.items():
                if name in names and proc.poll() is not None:
                    raise ProcessDied(f"ray node {name} exited ({proc.returncode}):\n{tail(self.log(name))}")
            return set(self.alive()) == names

        wait_until(ok, timeout_s, f"Ray nodes {sorted(names)}", tuple(self.log(n) for n in self.procs))

    def stop_node(self, name: str) -> None:
        """Stop one node the way a preempted machine goes: its whole process group, now."""
        proc = self.procs.pop(name)
        stop_process_group(proc, grace_s=15.0)

    def stop(self) -> None:
        """Stop every node (extra nodes first, while the head's GCS still answers their raylets: they are gone
        within a second; `stop_ray_node`: without waiting out their drain), then anything still running from this
        cluster's temp dirs (every node's starts with the head's).

        The head's own GCS and raylet do not exit on SIGTERM within 10 s once the GCS is shutting down; the
        20 s grace this used to give every node ended in SIGKILL all the same, so the head gets 5 s."""
        for name in sorted(self.procs, key=lambda n: n == "head"):
            stop_ray_node(self.procs.pop(name), grace_s=5.0 if name == "head" else 20.0)
        for pid in pids_mentioning(str(self.temp_dir)):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def run_cli(args: list[str], env: dict[str, str], timeout_s: float = 120.0) -> subprocess.CompletedProcess:
    """Run `stence ARGS` in a fresh process with `env` (the token-auth settings live only there)."""
    return subprocess.run([sys.executable, "-m", "stence.cli", *args], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=timeout_s)


# ---------------------------------------------------------------------------------------------------
# One two-node cluster shared by consecutive tests (conftest's `two_node_cluster` fixture)

SHARD_RESOURCE = "shard"  # one per node: tests/shard_reads.py pins one Train worker to each node with it


def start_two_node_cluster(root: Path) -> RayCluster:
    """Head + node2, 1 CPU and one SHARD_RESOURCE each; started a second time if a node dies while starting
    (on a loaded 2-core machine the head's client server can time out waiting for its own node's info)."""
    for attempt in (1, 2):
        (root / f"ray{attempt}").mkdir()
        cluster = RayCluster(root / f"ray{attempt}")
        try:
            cluster.start_head(num_cpus=1, resources={SHARD_RESOURCE: 1})
            cluster.add_node("node2", num_cpus=1, resources={SHARD_RESOURCE: 1})
            return cluster
        except ProcessDied:
            cluster.stop()
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


class SharedTwoNodeCluster:
    """The two-node cluster of `start_two_node_cluster`, started when a test first asks for it and kept for the
    tests right after it that ask too (conftest runs them one after the other); `stop` ends it (conftest: after
    the last of them). Starting and stopping a cluster costs tens of seconds on a 2-core machine.

    Tests sharing it leave it as they found it: every job they run is a driver process of their own that has
    exited when they end, and their files are in folders of their own (not under the cluster's root)."""

    def __init__(self) -> None:
        self.cluster: RayCluster | None = None
        self.root: Path | None = None

    def get(self) -> RayCluster:
        if self.cluster is not None:
            try:
                whole = set(self.cluster.alive()) == {"head", "node2"}
            except Exception:  # noqa: BLE001 - the head does not answer
                whole = False
            if not whole:  # a node is gone: a fresh cluster, not a half one
                self.stop()
        if self.cluster is None:
            self.root = make_root()
            self.cluster = start_two_node_cluster(self.root)
        return self.cluster

    def stop(self) -> None:
        cluster, root, self.cluster, self.root = self.cluster, self.root, None, None
        if cluster is not None:
            cluster.stop()
        if root is not None:
            shutil.rmtree(root, ignore_errors=True)
