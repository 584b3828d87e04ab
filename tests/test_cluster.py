"""A real cluster on this machine: PostgreSQL, the MLflow server of cluster/mlflow/serve.sh (users and
permissions on, as by default) and a two-node Ray cluster with token authentication; jobs go in through
`stence cluster` (the Ray Jobs SDK). The nodes log to MLflow as their own user, from the MLflow credentials
file in their home (as cluster.yaml links it); the submitting shell's MLflow password and STENCE_SALT
never reach a job.

Run with: .venv/bin/pytest tests/test_cluster.py -m cluster -q
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from tests.cluster_fixtures import (
    REPO,
    MlflowServer,
    Postgres,
    RayCluster,
    make_root,
    postgres_available,
    run_cli,
    write_mlflow_credentials,
)

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

SMOKE_EXPERIMENT = "stence-cluster-smoke"
SMOKE_MODEL = "stence-cluster-smoke"
SALT = "cluster-test-salt-0123456789"  # in the submitting shell only
NODE_USER = ("ray-nodes", "nodes-" + secrets.token_hex(12))  # the nodes' MLflow user (their credentials file)
# Custom resource of the (preemptible) worker nodes only, never of the head: the sweep's Train workers ask
# for it (train.worker_resources), so they run on node2 every time and are not left to the scheduler.
WORKER_RESOURCE = "spot"
WORKER_NODE_RESOURCES = {WORKER_RESOURCE: 2}  # two 1-CPU trials at a time, as many as node2's 2 CPUs

# The job's entrypoint: a driver pinned to the head (driver resource) runs one Ray task on the second
# node, which logs a run, a metric history and a registered model to the MLflow server whose URI only
# reached it through the job's runtime environment.
SMOKE_JOB = f"""
import json, os
import ray

ray.init()
driver_node = ray.get_runtime_context().get_node_id()


def mlflow_user():
    from mlflow.utils.credentials import read_mlflow_creds

    return read_mlflow_creds().username


@ray.remote(num_cpus=1, resources={{"node2": 1}})
def log_from_worker_node():
    import mlflow
    from mlflow.pyfunc import PythonModel

    class Doubler(PythonModel):
        def predict(self, context, model_input, params=None):
            return model_input * 2

    node = ray.get_runtime_context().get_node_id()
    mlflow.set_experiment({SMOKE_EXPERIMENT!r})
    with mlflow.start_run(run_name="from-node2") as run:
        mlflow.set_tag("ray.node_id", node)
        for step in range(3):
            mlflow.log_metric("smoke/loss", 1.0 / (step + 1), step=step)
        mlflow.pyfunc.log_model(
            name="model", python_model=Doubler(), registered_model_name={SMOKE_MODEL!r},
            pip_requirements=["mlflow==3.17.2"],
        )
    return {{
        "run_id": run.info.run_id,
        "artifact_uri": run.info.artifact_uri,
        "node_id": node,
        "tracking_uri": os.environ.get("MLFLOW_TRACKING_URI"),
        "secret_env": sorted(k for k in os.environ if k in ("STENCE_SALT", "MLFLOW_TRACKING_PASSWORD",
                                                            "MLFLOW_TRACKING_USERNAME", "RAY_AUTH_TOKEN")),
        "mlflow_user": mlflow_user(),
        "cwd": os.getcwd(),
    }}


result = ray.get(log_from_worker_node.remote())
result["driver_node_id"] = driver_node
result["driver_mlflow_user"] = mlflow_user()
print("SMOKE_RESULT " + json.dumps(result))
"""


@dataclass
class Stack:
    root: Path
    pg: Postgres
    mlflow: MlflowServer
    ray: RayCluster

    def job_env(self) -> dict[str, str]:
        """What a user's shell holds when submitting: token auth, the MLflow URI with the user's own MLflow
        credentials (the admin's here), the site salt. Only the URI may reach a job."""
        return {**self.ray.client_env(), **self.mlflow.client_env(), "STENCE_SALT": SALT}

    def secrets(self) -> dict[str, str]:
        """Values that must appear in no job info and no CLI output."""
        return {"salt": SALT, "submitter's MLflow password": self.mlflow.admin[1],
                "nodes' MLflow password": NODE_USER[1], "Ray token": self.ray.token_path.read_text().strip(),
                "database password": self.pg.password}


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    """PostgreSQL + MLflow (auth on) + Ray head (3 CPUs, driver resource) + node2 (2 CPUs, the node2 and
    worker resources); every node's HOME holds the nodes' MLflow credentials file. All stopped at the end."""
    if not postgres_available():
        pytest.skip("PostgreSQL server binaries not installed here: run `bash cluster/ci_install.sh`")
    pytest.importorskip("flask_wtf", reason="MLflow basic auth needs mlflow[auth] (Flask-WTF): cluster/ci_install.sh")
    root = make_root()
    pg = Postgres(root)
    mlflow = MlflowServer(root, pg.uri("mlflow"), pg.uri("mlflow_auth"), MLFLOW_PUBLIC_HOST="mlflow.test")
    node_home = root / "node-home"  # what /home/ray is on a node of cluster.yaml
    # the nodes get no MLflow URI (it must come through the job) and no MLflow variables: their user comes
    # from ~/.mlflow/credentials
    ray = RayCluster(root, node_env={"HOME": str(node_home)})
    failed = True
    try:
        pg.start(("mlflow", "mlflow_auth"))
        mlflow.start()
        mlflow.add_user(*NODE_USER)
        write_mlflow_credentials(node_home, NODE_USER)
        ray.start_head(num_cpus=3, resources={"driver": 2})
        ray.add_node("node2", num_cpus=2, resources={"node2": 1, **WORKER_NODE_RESOURCES})
        yield Stack(root, pg, mlflow, ray)
        failed = False
    finally:
        ray.stop()
        mlflow.stop()
        pg.stop()
        if failed or os.environ.get("STENCE_KEEP_CLUSTER_LOGS"):
            print(f"cluster test logs kept in {root}", file=sys.stderr)
        else:
            shutil.rmtree(root, ignore_errors=True)


def submit(stack: Stack, command: list[str], *extra: str, env: dict[str, str] | None = None,
           timeout_s: float = 600.0) -> tuple[str, str]:
    """`stence cluster submit --wait`; returns (submission id, CLI output)."""
    r = run_cli(["cluster", "submit", "--address", stack.ray.dashboard_url, "--driver-resource", "driver=1",
                 *extra, "--", *command], env or stack.job_env(), timeout_s=timeout_s)
    found = re.search(r"submitted (\S+)", r.stdout)
    assert found, f"no submission id:\n{r.stdout}\n{r.stderr}"
    return found.group(1), r.stdout + r.stderr


def status(stack: Stack, job_id: str) -> dict:
    r = run_cli(["cluster", "status", job_id, "--json", "--address", stack.ray.dashboard_url], stack.job_env())
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def job_logs(stack: Stack, job_id: str) -> str:
    r = run_cli(["cluster", "logs", job_id, "--address", stack.ray.dashboard_url], stack.job_env())
    assert r.returncode == 0, r.stderr
    return r.stdout


# ---------------------------------------------------------------------------------------------------


def test_token_auth_is_enforced(stack: Stack) -> None:
    url = f"{stack.ray.dashboard_url}/api/jobs/"
    assert requests.get(url, timeout=10).status_code == 401
    bad = requests.get(url, headers={"Authorization": "Bearer not-the-token"}, timeout=10)
    assert bad.status_code == 403
    good = requests.get(url, headers={"Authorization": f"Bearer {stack.ray.token_path.read_text()}"}, timeout=10)
    assert good.status_code == 200

    no_auth = {k: v for k, v in stack.job_env().items() if k not in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH")}
    r = run_cli(["cluster", "list", "--address", stack.ray.dashboard_url], no_auth)
    assert r.returncode == 1
    assert "RAY_AUTH_MODE" in r.stderr  # the error tells what to set

    r = run_cli(["cluster", "list", "--json", "--address", stack.ray.dashboard_url], stack.job_env())
    assert r.returncode == 0, r.stderr
    assert isinstance(json.loads(r.stdout), list)


def test_smoke_job_logs_to_mlflow_from_the_second_node(stack: Stack) -> None:
    nodes = stack.ray.alive()
    job_id, out = submit(stack, ["python", "-c", SMOKE_JOB], "--wait")
    assert f"job {job_id}: SUCCEEDED" in out, out + job_logs(stack, job_id)
    passed = next(ln for ln in out.splitlines() if "env passed to the job:" in ln)
    held = next(ln for ln in out.splitlines() if "not passed" in ln)
    assert "MLFLOW_TRACKING_URI" in passed and "STENCE_SALT" not in passed and "PASSWORD" not in passed
    assert "STENCE_SALT" in held and "MLFLOW_TRACKING_PASSWORD" in held  # said, not sent

    info = status(stack, job_id)
    assert info["status"] == "SUCCEEDED"
    assert info["entrypoint"].startswith("python -c ")
    line = next(ln for ln in job_logs(stack, job_id).splitlines() if ln.startswith("SMOKE_RESULT "))
    result = json.loads(line.removeprefix("SMOKE_RESULT "))

    # placement: driver on the head (driver resource), the task on the other node
    assert result["driver_node_id"] == nodes["head"]["node_id"]
    assert result["node_id"] == nodes["node2"]["node_id"]
    # environment: the MLflow URI came through the job's runtime env, the code as working_dir; no secret
    # did; the driver and the task logged as the nodes' user, from the credentials file in their HOME
    assert result["tracking_uri"] == stack.mlflow.url
    assert result["secret_env"] == []
    assert result["mlflow_user"] == result["driver_mlflow_user"] == NODE_USER[0]
    assert "runtime_resources" in result["cwd"] and "working_dir_files" in result["cwd"]
    assert result["artifact_uri"].startswith("mlflow-artifacts:/")  # proxied, no storage credentials

    # the MLflow REST API sees the run, its metric history and the registered model
    run_id = result["run_id"]
    run = stack.mlflow.api("GET", "runs/get", params={"run_id": run_id}).json()["run"]
    assert run["info"]["status"] == "FINISHED"
    tags = {t["key"]: t["value"] for t in run["data"]["tags"]}
    assert tags["ray.node_id"] == nodes["node2"]["node_id"]
    hist = stack.mlflow.api("GET", "metrics/get-history", params={"run_id": run_id, "metric_key": "smoke/loss"})
    values = sorted((m["step"], m["value"]) for m in hist.json()["metrics"])
    assert values == [(0, 1.0), (1, 0.5), (2, pytest.approx(1 / 3))]
    versions = stack.mlflow.api("GET", "model-versions/search", params={"filter": f"name='{SMOKE_MODEL}'"}).json()
    assert [v["run_id"] for v in versions["model_versions"]] == [run_id]
    # the server knows who registered it: the nodes' user MANAGEs the model it created
    perm = stack.mlflow.api("GET", "users/permissions/get", version="3.0",
                            params={"username": NODE_USER[0], "resource_type": "registered_model",
                                    "resource_id": SMOKE_MODEL})
    assert perm.status_code == 200 and "MANAGE" in perm.text, perm.text

    # ... because it is stored in PostgreSQL, and the model files landed in the server's artifact folder
    assert stack.pg.query("mlflow", "SELECT status FROM runs WHERE run_uuid = %s", (run_id,)) == [("FINISHED",)]
    n_metrics = stack.pg.query("mlflow", "SELECT count(*) FROM metrics WHERE run_uuid = %s AND key = %s",
                               (run_id, "smoke/loss"))
    assert n_metrics == [(3,)]
    assert stack.pg.query("mlflow", "SELECT name FROM registered_models WHERE name = %s", (SMOKE_MODEL,))
    assert list(stack.mlflow.artifacts.rglob("MLmodel")), "model files not in the proxied artifact folder"

    listed = run_cli(["cluster", "list", "--json", "--address", stack.ray.dashboard_url], stack.job_env())
    assert job_id in {j["submission_id"] for j in json.loads(listed.stdout)}


def test_stop_a_running_job(stack: Stack) -> None:
    job_id, _ = submit(stack, ["python", "-c", "import time; print('started', flush=True); time.sleep(600)"])
    deadline = time.monotonic() + 120
    while stack.ray.job_status(job_id) != "RUNNING":  # the wait polls the Jobs API; the CLI's answer below
        assert time.monotonic() < deadline, status(stack, job_id)
        time.sleep(1)
    assert status(stack, job_id)["status"] == "RUNNING"  # it sleeps for 10 minutes
    r = run_cli(["cluster", "stop", job_id, "--address", stack.ray.dashboard_url], stack.job_env())
    assert r.returncode == 0 and "stop requested" in r.stdout
    deadline = time.monotonic() + 60
    while stack.ray.job_status(job_id) != "STOPPED":
        assert time.monotonic() < deadline, status(stack, job_id)
        time.sleep(1)
    assert status(stack, job_id)["status"] == "STOPPED"
    text = run_cli(["cluster", "status", job_id, "--address", stack.ray.dashboard_url], stack.job_env()).stdout
    assert text.startswith(f"{job_id}: STOPPED")
    listed = run_cli(["cluster", "list", "--address", stack.ray.dashboard_url], stack.job_env()).stdout
    assert any(line.split()[:2] == [job_id, "STOPPED"] for line in listed.splitlines())


def test_job_info_holds_no_secret(stack: Stack) -> None:
    """After a submit from a shell holding STENCE_SALT and the user's MLflow password, neither is in the
    job info any token holder reads (`list_jobs()`: GET /api/jobs/, `stence cluster list/status`), nor in
    anything `stence cluster` printed; `--env` cannot send one either."""
    job_id, out = submit(stack, ["python", "-c", "print('hello')"], "--wait")
    assert f"job {job_id}: SUCCEEDED" in out, out
    token = stack.ray.token_path.read_text().strip()
    jobs = requests.get(f"{stack.ray.dashboard_url}/api/jobs/", headers={"Authorization": f"Bearer {token}"},
                        timeout=30)
    assert jobs.status_code == 200
    mine = next(j for j in jobs.json() if j["submission_id"] == job_id)
    assert mine["runtime_env"]["env_vars"] == {"MLFLOW_TRACKING_URI": stack.mlflow.url,
                                               "MLFLOW_DISABLE_TELEMETRY": "true"}
    printed = [out]
    for args in (["list", "--json"], ["status", job_id, "--json"], ["logs", job_id]):
        r = run_cli(["cluster", *args, "--address", stack.ray.dashboard_url], stack.job_env())
        assert r.returncode == 0, r.stderr
        printed.append(r.stdout + r.stderr)
    for what, value in stack.secrets().items():
        assert value not in jobs.text, f"{what} in the job info"
        assert not [p for p in printed if value in p], f"{what} printed by stence cluster"
    for name in ("STENCE_SALT", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_USERNAME"):
        assert name not in json.dumps(mine)  # (other jobs' entrypoints may mention the names)

    before = {j["submission_id"] for j in jobs.json()}
    r = run_cli(["cluster", "submit", "--address", stack.ray.dashboard_url, "--env", f"STENCE_SALT={SALT}", "--",
                 "python", "-c", "1"], stack.job_env())
    assert r.returncode == 1 and "readable by everyone holding the cluster's token" in r.stderr
    assert SALT not in r.stdout + r.stderr
    after = requests.get(f"{stack.ray.dashboard_url}/api/jobs/", headers={"Authorization": f"Bearer {token}"},
                         timeout=30).json()
    assert {j["submission_id"] for j in after} == before  # nothing was submitted


def test_mlflow_server_is_closed_and_checks_the_host_header(stack: Stack) -> None:
    body = {"max_results": 1}
    assert stack.mlflow.api("POST", "experiments/search", auth=None, json=body).status_code == 401
    ok = stack.mlflow.api("POST", "experiments/search", json=body,
                          headers={"Host": f"mlflow.test:{stack.mlflow.port}"})
    assert ok.status_code == 200, ok.text
    rebinding = stack.mlflow.api("POST", "experiments/search", json=body, headers={"Host": "evil.example"})
    assert rebinding.status_code in (400, 403), rebinding.status_code


# ---------------------------------------------------------------------------------------------------
# The real sweep through the cluster (needs `stence tune`, `stence synth` and `stence ingest`).

SWEEP_EXPERIMENT = "stence-cluster-sweep"


def _commands_present(*names: str) -> list[str]:
    return [n for n in names if not (REPO / "stence" / "commands" / f"{n}.py").exists()]


def _train_workers(stack: Stack, state: str | None = "ALIVE") -> list[str]:
    """Node ids of the Ray Train workers (RayTrainWorker actors) in `state` (None: every state, the dead too)
    that were placed on a node."""
    return [a["node_id"] for a in stack.ray.actors(state)
            if a.get("class_name") == "RayTrainWorker" and a.get("node_id")]


def _runs(stack: Stack, experiment_id: str) -> list[dict]:
    r = stack.mlflow.api("POST", "runs/search", json={"experiment_ids": [experiment_id], "max_results": 100})
    r.raise_for_status()
    return list(r.json().get("runs", []))


@pytest.mark.timeout(2400)
def test_cluster_sweep(stack: Stack) -> None:
    """`stence tune --space smoke --num-samples 2` as a job whose Train workers are pinned to the worker
    nodes (train.worker_resources); node2 is stopped once mid-sweep and a replacement node joins."""
    missing = _commands_present("tune", "synth", "ingest", "features")
    if missing:
        pytest.skip(f"stence {', '.join(missing)} not written yet (stence/commands/<name>.py missing)")
    env = stack.job_env()
    shared = stack.root / "shared"  # what NFS/S3 is on a real cluster: every node sees the same path
    raw, cohort = shared / "raw", shared / "cohort"
    for args in (["synth", str(raw), "--size", "tiny", "--patients", "30"], ["ingest", str(raw), "--out", str(cohort), "--processes", "1"]):
        r = run_cli(args, env, timeout_s=600)
        assert r.returncode == 0, f"stence {args[0]} failed:\n{r.stdout}\n{r.stderr}"
    # the angiography features are extracted on the cluster too (Ray Data), into the shared cohort
    job_id, out = submit(stack, ["stence", "features", "--set", f"data.cohort={cohort}"], "--wait")
    assert f"job {job_id}: SUCCEEDED" in out, job_logs(stack, job_id)[-5000:]

    sweep = [
        "stence", "tune", "--space", "smoke", "--num-samples", "2",
        "--set", f"data.cohort={cohort}", "train.workers=1", f"train.storage_path={shared / 'ray'}",
        "train.name=cluster-sweep", f"tracking.experiment={SWEEP_EXPERIMENT}", "optim.epochs=2",
        "train.max_failures=3", f"train.worker_resources={WORKER_RESOURCE}=1",
    ]
    job_id, _ = submit(stack, sweep, timeout_s=60)

    # wait until training is under way (a child run has a metric, so there is a checkpoint to resume from)
    # while a Train worker is alive, then take node2 away once
    node2 = stack.ray.alive()["node2"]["node_id"]
    deadline = time.monotonic() + 900
    exp_id = None
    while True:
        # polled through the Jobs API in this process: a `stence cluster status` per poll took CPU from the sweep
        st = stack.ray.job_status(job_id)
        assert st in ("PENDING", "RUNNING"), f"sweep ended early ({st}):\n{job_logs(stack, job_id)[-5000:]}"
        assert time.monotonic() < deadline, "no trial reported a metric while a Train worker ran, in time"
        got = stack.mlflow.api("GET", "experiments/get-by-name", params={"experiment_name": SWEEP_EXPERIMENT})
        if got.status_code == 200:
            exp_id = got.json()["experiment"]["experiment_id"]
            runs = _runs(stack, exp_id)
            if any(r["data"].get("metrics") and "mlflow.parentRunId" in {t["key"] for t in r["data"].get("tags", [])}
                   for r in runs) and (workers := _train_workers(stack)):
                break
        time.sleep(2)
    # deterministic placement: every Train worker is on node2, the one node offering the worker resource
    assert workers and set(workers) == {node2}, (workers, node2, stack.ray.alive())
    on_node2 = sorted({a["class_name"] for a in stack.ray.actors() if a.get("node_id") == node2})
    stack.ray.stop_node("node2")
    assert "node2" not in stack.ray.alive()
    print(f"stopped node2 while it ran {on_node2}")
    # what a cluster's autoscaler does for a reclaimed spot node: a replacement offering the same resource
    stack.ray.add_node("node3", num_cpus=2, resources=WORKER_NODE_RESOURCES)
    node3 = stack.ray.alive()["node3"]["node_id"]

    deadline = time.monotonic() + 1500
    while (st := stack.ray.job_status(job_id)) not in ("SUCCEEDED", "FAILED", "STOPPED"):
        assert time.monotonic() < deadline, "sweep did not finish"
        time.sleep(2)
    assert st == "SUCCEEDED", job_logs(stack, job_id)[-8000:]
    assert status(stack, job_id)["status"] == "SUCCEEDED"  # and `stence cluster status` says so
    # every Train worker of the sweep (and of the probe of its best encoder) ran on a worker node, and the
    # work node2 lost was resumed on its replacement
    every_worker = _train_workers(stack, state=None)
    assert set(every_worker) <= {node2, node3}, (every_worker, node2, node3)
    assert node2 in every_worker and node3 in every_worker, (every_worker, node2, node3)

    runs = _runs(stack, exp_id)
    def tags(r):
        return {t["key"]: t["value"] for t in r["data"].get("tags", [])}

    nested = [r for r in runs if "mlflow.parentRunId" in tags(r)]
    parents = {tags(r)["mlflow.parentRunId"] for r in nested}
    # two trial runs, plus the probe of the best encoder that was registered (nested under the sweep too)
    children = [r for r in nested if "stence.trial_id" in tags(r)]
    probes = [r for r in nested if tags(r).get("stence.stage") == "probe"]
    assert len(parents) == 1 and len(children) == 2 and len(probes) == 1, [r["info"]["run_name"] for r in runs]
    parent_id = parents.pop()
    assert parent_id in {r["info"]["run_id"] for r in runs}
    assert all(r["info"]["status"] == "FINISHED" for r in runs), [(r["info"]["run_name"], r["info"]["status"])
                                                                   for r in runs]
    assert all(r["data"].get("metrics") for r in children)
    assert all(r["data"].get("params") for r in children)
    # in PostgreSQL
    rows = stack.pg.query("mlflow", "SELECT count(*) FROM runs WHERE experiment_id = %s", (int(exp_id),))
    assert rows == [(4,)]
    assert stack.pg.query("mlflow", "SELECT count(*) FROM metrics m JOIN runs r ON m.run_uuid = r.run_uuid "
                          "WHERE r.experiment_id = %s", (int(exp_id),))[0][0] > 0
    models = stack.pg.query("mlflow", "SELECT mv.name FROM model_versions mv WHERE mv.run_id = ANY(%s)",
                            ([r["info"]["run_id"] for r in runs],))
    assert models, "the sweep registered no model version"
    # checkpoints and Tune state on the shared storage path
    assert any((shared / "ray").rglob("*")), "nothing under train.storage_path"
