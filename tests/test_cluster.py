"""A real cluster on this machine: PostgreSQL, the MLflow server of cluster/mlflow/serve.sh and a two-node
Ray cluster with token authentication; jobs go in through `stence cluster` (the Ray Jobs SDK).

Run with: .venv/bin/pytest tests/test_cluster.py -m cluster -q
"""

from __future__ import annotations

import json
import os
import re
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
)

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

SMOKE_EXPERIMENT = "stence-cluster-smoke"
SMOKE_MODEL = "stence-cluster-smoke"
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
        "salt_passed": os.environ.get("STENCE_SALT") == "cluster-test-salt",
        "cwd": os.getcwd(),
    }}


result = ray.get(log_from_worker_node.remote())
result["driver_node_id"] = driver_node
print("SMOKE_RESULT " + json.dumps(result))
"""


@dataclass
class Stack:
    root: Path
    pg: Postgres
    mlflow: MlflowServer
    ray: RayCluster

    def job_env(self) -> dict[str, str]:
        """What a user's shell holds when submitting: token auth, the MLflow URI, the site salt."""
        return {**self.ray.client_env(), "MLFLOW_TRACKING_URI": self.mlflow.url, "STENCE_SALT": "cluster-test-salt"}


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    """PostgreSQL + MLflow + Ray head (3 CPUs, driver resource) + node2 (2 CPUs, the node2 and worker
    resources); all stopped at the end."""
    if not postgres_available():
        pytest.skip("PostgreSQL server binaries not installed here: run `bash cluster/ci_install.sh`")
    root = make_root()
    pg = Postgres(root)
    mlflow = MlflowServer(root, pg.uri("mlflow"), MLFLOW_PUBLIC_HOST="mlflow.test")
    ray = RayCluster(root)  # the nodes get no MLflow URI: it must come through the job
    failed = True
    try:
        pg.start(("mlflow", "mlflow_auth"))
        mlflow.start()
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
    assert "MLFLOW_TRACKING_URI" in out and "STENCE_SALT" in out  # reported as passed through

    info = status(stack, job_id)
    assert info["status"] == "SUCCEEDED"
    assert info["entrypoint"].startswith("python -c ")
    line = next(ln for ln in job_logs(stack, job_id).splitlines() if ln.startswith("SMOKE_RESULT "))
    result = json.loads(line.removeprefix("SMOKE_RESULT "))

    # placement: driver on the head (driver resource), the task on the other node
    assert result["driver_node_id"] == nodes["head"]["node_id"]
    assert result["node_id"] == nodes["node2"]["node_id"]
    # environment: the MLflow URI and the salt came through the job's runtime env, the code as working_dir
    assert result["tracking_uri"] == stack.mlflow.url
    assert result["salt_passed"] is True
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
    while status(stack, job_id)["status"] != "RUNNING":
        assert time.monotonic() < deadline, status(stack, job_id)
        time.sleep(1)
    r = run_cli(["cluster", "stop", job_id, "--address", stack.ray.dashboard_url], stack.job_env())
    assert r.returncode == 0 and "stop requested" in r.stdout
    deadline = time.monotonic() + 60
    while status(stack, job_id)["status"] != "STOPPED":
        assert time.monotonic() < deadline, status(stack, job_id)
        time.sleep(1)
    text = run_cli(["cluster", "status", job_id, "--address", stack.ray.dashboard_url], stack.job_env()).stdout
    assert text.startswith(f"{job_id}: STOPPED")
    listed = run_cli(["cluster", "list", "--address", stack.ray.dashboard_url], stack.job_env()).stdout
    assert any(line.split()[:2] == [job_id, "STOPPED"] for line in listed.splitlines())


def test_mlflow_server_checks_the_host_header(stack: Stack) -> None:
    body = {"max_results": 1}
    ok = stack.mlflow.api("POST", "experiments/search", json=body,
                          headers={"Host": f"mlflow.test:{stack.mlflow.port}"})
    assert ok.status_code == 200, ok.text
    rebinding = stack.mlflow.api("POST", "experiments/search", json=body, headers={"Host": "evil.example"})
    assert rebinding.status_code in (400, 403), rebinding.status_code


def test_mlflow_basic_auth(stack: Stack) -> None:
    """serve.sh with MLFLOW_BASIC_AUTH=1: users in their own database, anonymous requests refused."""
    pytest.importorskip("flask_wtf", reason="MLflow basic auth needs mlflow[auth] (Flask-WTF): cluster/ci_install.sh")
    password = "admin-secret-123"
    server = MlflowServer(stack.root, stack.pg.uri("mlflow"), name="mlflow-auth", MLFLOW_BASIC_AUTH="1",
                          MLFLOW_AUTH_DATABASE_URI=stack.pg.uri("mlflow_auth"),
                          MLFLOW_AUTH_ADMIN_PASSWORD=password)
    try:
        server.start()
        body = {"max_results": 1}
        assert server.api("POST", "experiments/search", json=body).status_code == 401
        assert server.api("POST", "experiments/search", json=body, auth=("admin", "wrong")).status_code == 401
        r = server.api("POST", "experiments/search", json=body, auth=("admin", password))
        assert r.status_code == 200, r.text
        users = stack.pg.query("mlflow_auth", "SELECT username FROM users")
        assert ("admin",) in users
    finally:
        server.stop()


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
        st = status(stack, job_id)["status"]
        assert st in ("PENDING", "RUNNING"), f"sweep ended early ({st}):\n{job_logs(stack, job_id)[-5000:]}"
        assert time.monotonic() < deadline, "no trial reported a metric while a Train worker ran, in time"
        got = stack.mlflow.api("GET", "experiments/get-by-name", params={"experiment_name": SWEEP_EXPERIMENT})
        if got.status_code == 200:
            exp_id = got.json()["experiment"]["experiment_id"]
            runs = _runs(stack, exp_id)
            if any(r["data"].get("metrics") and "mlflow.parentRunId" in {t["key"] for t in r["data"].get("tags", [])}
                   for r in runs) and (workers := _train_workers(stack)):
                break
        time.sleep(3)
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
    while (st := status(stack, job_id)["status"]) not in ("SUCCEEDED", "FAILED", "STOPPED"):
        assert time.monotonic() < deadline, "sweep did not finish"
        time.sleep(5)
    assert st == "SUCCEEDED", job_logs(stack, job_id)[-8000:]
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
