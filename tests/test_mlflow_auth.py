"""The shared MLflow server is closed by default: a real `mlflow server` started by cluster/mlflow/serve.sh
with PostgreSQL, configured as a site would (database URIs without passwords, the passwords in mode-600
files), refuses anonymous reads and writes, refuses a user without permission on the model who tries to
move `@champion`, and no process shows the database password on its command line.

Users are created and granted through `stence cluster user` (as the admin). One PostgreSQL and one MLflow
server for the module; no Ray.

Run with: .venv/bin/pytest tests/test_mlflow_auth.py -m cluster -q
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from tests.cluster_fixtures import (
    MlflowServer,
    Postgres,
    make_root,
    pids_mentioning,
    postgres_available,
    run_cli,
)

pytestmark = [pytest.mark.cluster]

MODEL = "stence-ecg-encoder-authtest"
EXPERIMENT = "auth-test"
TRAINER = ("trainer", "trainer-pw-0123456789")
ALICE_PASSWORD = "alice-pw-0123456789"


@dataclass
class Site:
    root: Path
    pg: Postgres
    server: MlflowServer
    experiment_id: str
    run_id: str


def _as(server: MlflowServer, user: tuple[str, str]) -> dict[str, str]:
    """A CLI environment using the server as `user` (nothing else MLflow-related inherited)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    return {**env, **server.client_env(user), "MLFLOW_DISABLE_TELEMETRY": "true"}


def _champion(server: MlflowServer) -> str:
    r = server.api("GET", "registered-models/get", params={"name": MODEL})
    assert r.status_code == 200, r.text
    return {a["alias"]: a["version"] for a in r.json()["registered_model"].get("aliases", [])}["champion"]


@pytest.fixture(scope="module")
def site() -> Iterator[Site]:
    """PostgreSQL + serve.sh (auth on by default; passwords only in files), and a model with two versions,
    v1 champion, registered by a `trainer` user as a sweep would."""
    if not postgres_available():
        pytest.skip("PostgreSQL server binaries not installed here: run `bash cluster/ci_install.sh`")
    pytest.importorskip("flask_wtf", reason="MLflow basic auth needs mlflow[auth] (Flask-WTF): cluster/ci_install.sh")
    root = make_root()
    pg = Postgres(root)
    server = None
    failed = True
    try:
        pg.start(("mlflow", "mlflow_auth"))
        secrets_dir = root / "secrets"
        secrets_dir.mkdir(mode=0o700)
        server = MlflowServer(root, pg.uri("mlflow", with_password=False), pg.uri("mlflow_auth", with_password=False),
                              MLFLOW_DB_PASSWORD_FILE=str(pg.password_file(secrets_dir / "db.password")))
        admin_file = secrets_dir / "admin.password"
        admin_file.write_text(server.admin[1] + "\n")
        admin_file.chmod(0o600)
        del server.env["MLFLOW_AUTH_ADMIN_PASSWORD"]
        server.env["MLFLOW_AUTH_ADMIN_PASSWORD_FILE"] = str(admin_file)
        server.start()

        server.add_user(*TRAINER)  # no grants: it MANAGEs what it creates
        with pytest.MonkeyPatch.context() as mp:
            for k, v in server.client_env(TRAINER).items():
                mp.setenv(k, v)
            import mlflow

            client = mlflow.MlflowClient(tracking_uri=server.url, registry_uri=server.url)
            exp_id = client.create_experiment(EXPERIMENT)
            run_id = client.create_run(exp_id).info.run_id
            client.log_text(run_id, "weights", "model/scorer.txt")
            client.set_terminated(run_id)
            client.create_registered_model(MODEL)
            for _ in range(2):
                client.create_model_version(MODEL, source=f"runs:/{run_id}/model", run_id=run_id)
            client.set_registered_model_alias(MODEL, "champion", "1")
        yield Site(root, pg, server, exp_id, run_id)
        failed = False
    finally:
        if server is not None:
            server.stop()
        pg.stop()
        if failed or os.environ.get("STENCE_KEEP_CLUSTER_LOGS"):
            print(f"auth test logs kept in {root}", file=sys.stderr)
        else:
            shutil.rmtree(root, ignore_errors=True)


def test_anonymous_client_can_neither_read_nor_write(site: Site) -> None:
    s = site.server
    reads = [
        ("POST", "experiments/search", {"json": {"max_results": 10}}),
        ("GET", "experiments/get-by-name", {"params": {"experiment_name": EXPERIMENT}}),
        ("GET", "runs/get", {"params": {"run_id": site.run_id}}),
        ("GET", "registered-models/get", {"params": {"name": MODEL}}),
        ("GET", "registered-models/alias", {"params": {"name": MODEL, "alias": "champion"}}),
        ("GET", "model-versions/get", {"params": {"name": MODEL, "version": "1"}}),
    ]
    writes = [
        ("POST", "experiments/delete", {"json": {"experiment_id": site.experiment_id}}),
        ("POST", "runs/create", {"json": {"experiment_id": site.experiment_id}}),
        ("POST", "registered-models/create", {"json": {"name": "intruder"}}),
        ("POST", "model-versions/create", {"json": {"name": MODEL, "source": f"runs:/{site.run_id}/model"}}),
        ("POST", "registered-models/alias", {"json": {"name": MODEL, "alias": "champion", "version": "2"}}),
        ("DELETE", "registered-models/alias", {"json": {"name": MODEL, "alias": "champion"}}),
    ]
    for method, path, kwargs in reads + writes:
        r = s.api(method, path, auth=None, **kwargs)
        assert r.status_code == 401, (method, path, r.status_code, r.text[:200])
    for auth in (("admin", "wrong-password-123"), ("nobody", "no-such-user-123")):  # a wrong password is no user
        for method, path, kwargs in (reads[0], writes[0], writes[-2]):
            r = s.api(method, path, auth=auth, **kwargs)
            assert r.status_code == 401, (method, path, auth[0], r.status_code, r.text[:200])
    # the artifact proxy and the UI are behind the same door; /health stays open for probes
    art = requests.get(f"{s.url}/api/2.0/mlflow-artifacts/artifacts", params={"path": site.experiment_id}, timeout=30)
    assert art.status_code == 401
    assert requests.get(f"{s.url}/", timeout=30).status_code == 401
    assert requests.get(f"{s.url}/health", timeout=30).status_code == 200

    # nothing changed: the experiment is live, no model was created, the champion is still v1
    exp = s.api("GET", "experiments/get", params={"experiment_id": site.experiment_id}).json()["experiment"]
    assert exp["lifecycle_stage"] == "active"
    assert s.api("GET", "registered-models/get", params={"name": "intruder"}).status_code == 404
    assert _champion(s) == "1"
    # a new user is created with nothing: the server's default permission is NO_PERMISSIONS
    ini = Path(s.env["MLFLOW_STATE_DIR"]) / "basic_auth.ini"
    assert "default_permission = NO_PERMISSIONS" in ini.read_text()
    assert stat.S_IMODE(ini.stat().st_mode) == 0o600


def test_user_without_permission_cannot_move_the_champion(site: Site, tmp_path: Path) -> None:
    s = site.server
    admin = _as(s, s.admin)
    pw_file = tmp_path / "alice.password"
    pw_file.write_text(ALICE_PASSWORD + "\n")
    pw_file.chmod(0o644)
    r = run_cli(["cluster", "user", "add", "alice", "--password-file", str(pw_file)], admin)
    assert r.returncode == 1 and "chmod 600" in r.stderr  # a password file others can read is refused
    pw_file.chmod(0o600)
    r = run_cli(["cluster", "user", "add", "alice", "--password-file", str(pw_file)], admin)
    assert r.returncode == 0, r.stdout + r.stderr
    assert ALICE_PASSWORD not in r.stdout + r.stderr
    alice = ("alice", ALICE_PASSWORD)
    move = {"json": {"name": MODEL, "alias": "champion", "version": "2"}}

    # authenticated, but no permission on the model: can neither see it nor move or delete its alias
    assert s.api("GET", "registered-models/get", auth=alice, params={"name": MODEL}).status_code == 403
    assert s.api("POST", "registered-models/alias", auth=alice, **move).status_code == 403
    assert s.api("DELETE", "registered-models/alias", auth=alice,
                 json={"name": MODEL, "alias": "champion"}).status_code == 403
    assert s.api("POST", "experiments/delete", auth=alice,
                 json={"experiment_id": site.experiment_id}).status_code == 403
    # a user cannot grant themselves anything
    grant = {"username": "alice", "resource_type": "registered_model", "resource_id": MODEL, "permission": "EDIT"}
    assert s.api("POST", "users/permissions/grant", auth=alice, version="3.0", json=grant).status_code == 403
    # READ lets alice look, still not move
    r = run_cli(["cluster", "user", "grant", "alice", "--model", MODEL, "--permission", "READ"], admin)
    assert r.returncode == 0 and "READ on registered model" in r.stdout, r.stdout + r.stderr
    assert s.api("GET", "registered-models/get", auth=alice, params={"name": MODEL}).status_code == 200
    assert s.api("POST", "registered-models/alias", auth=alice, **move).status_code == 403
    assert _champion(s) == "1"

    # EDIT, granted by the admin, is what moving @champion takes (the refusals above were permission
    # decisions, not a broken endpoint); the grant replaces the earlier READ
    r = run_cli(["cluster", "user", "grant", "alice", "--model", MODEL, "--permission", "EDIT"], admin)
    assert r.returncode == 0, r.stdout + r.stderr
    assert s.api("POST", "registered-models/alias", auth=alice, **move).status_code == 200
    assert _champion(s) == "2"
    assert s.api("POST", "registered-models/alias", auth=site.server.admin,
                 json={"name": MODEL, "alias": "champion", "version": "1"}).status_code == 200


def test_credentials_file_for_the_nodes(site: Site, tmp_path: Path) -> None:
    """`stence cluster user add --credentials-file` writes a mode-600 MLflow credentials file (what the Ray
    nodes mount) that MLflow itself reads; the password is printed nowhere."""
    s = site.server
    creds = tmp_path / "home" / ".mlflow" / "credentials"
    r = run_cli(["cluster", "user", "add", "ray-nodes", "--credentials-file", str(creds)], _as(s, s.admin))
    assert r.returncode == 0, r.stdout + r.stderr
    assert stat.S_IMODE(creds.stat().st_mode) == 0o600 and stat.S_IMODE(creds.parent.stat().st_mode) == 0o700
    password = next(ln.split("=", 1)[1].strip() for ln in creds.read_text().splitlines()
                    if ln.startswith("mlflow_tracking_password"))
    assert password not in r.stdout + r.stderr
    # MLflow in a process whose HOME holds the file authenticates as ray-nodes (no variables set)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update({"HOME": str(tmp_path / "home"), "MLFLOW_TRACKING_URI": s.url})
    probe = ("import mlflow; c = mlflow.MlflowClient(); e = c.create_experiment('nodes-own'); "
             "print('created', c.get_experiment(e).name)")
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "created nodes-own" in out.stdout, out.stderr[-2000:]
    # ... and that user sees nothing it was not granted
    assert s.api("GET", "registered-models/get", auth=("ray-nodes", password), params={"name": MODEL}).status_code == 403


def test_no_password_on_any_command_line(site: Site) -> None:
    """/proc/*/cmdline of every process: neither the database password nor the admin's appears, while the
    server's own processes (found by their artifact folder) are there to be read."""
    s = site.server
    assert pids_mentioning(str(s.artifacts)), "the scan does not see the MLflow server's processes"
    secrets_ = {"database": site.pg.password.encode(), "admin": s.admin[1].encode(),
                "alice": ALICE_PASSWORD.encode()}
    seen = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        seen.extend(f"{what} in pid {entry.name}" for what, value in secrets_.items() if value in cmdline)
    assert not seen, seen
    # nor in serve.sh's and the server's log, nor in the auth config it wrote
    log = s.log.read_text(errors="replace")
    ini = (Path(s.env["MLFLOW_STATE_DIR"]) / "basic_auth.ini").read_text()
    for value in secrets_.values():
        assert value.decode() not in log and value.decode() not in ini
