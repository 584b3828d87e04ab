"""Offline checks of the cluster files: launcher configs validated the way `ray up` does, the KubeRay
RayJob and MLflow manifests, serve.sh's refusals, and the job runtime environment `stence cluster submit`
builds (packaged by Ray's own working_dir code)."""

from __future__ import annotations

import configparser
import copy
import json
import os
import re
import shlex
import subprocess
import sys
import zipfile
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from stence.cluster import submit as sj

REPO = Path(__file__).resolve().parents[1]
PINS = {d.split("==")[0].split("[")[0]: d.split("==")[1] for d in sj.pinned_requirements() if "==" in d}
CREDENTIAL_IN_URI = re.compile(r"://[^/@\s:]+:[^/@\s]+@")  # user:password@ in a URI


def load(rel: str) -> dict:
    return yaml.safe_load((REPO / rel).read_text())


def prepared(cfg: dict) -> dict:
    """What `ray up` does before launching anything: defaults merged, then schema + semantic checks."""
    out = prepare_config(copy.deepcopy(cfg))
    validate_config(out)
    return out


# --------------------------------------------------------------------------------------------------- cluster.yaml


def test_pins_match_the_installed_ray() -> None:
    assert PINS["ray"] == ray.__version__ == "2.60.0"


def test_cluster_yaml_validates_like_ray_up() -> None:
    cfg = prepared(load("cluster.yaml"))
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    workers = {name: t for name, t in types.items() if name != cfg["head_node_type"]}
    # drivers only fit on the head; the head has no GPU, the workers have GPUs and a min/max count
    assert head["resources"].get("driver", 0) >= 1 and "GPU" not in head["resources"]
    assert workers and all("driver" not in t["resources"] for t in workers.values())
    gpu = [t for t in workers.values() if t["resources"].get("GPU", 0) >= 1]
    assert gpu and all(0 <= t["min_workers"] <= t["max_workers"] <= cfg["max_workers"] for t in gpu)
    assert any(t["node_config"].get("InstanceMarketOptions", {}).get("MarketType") == "spot" for t in gpu)


def test_cluster_yaml_images_match_pinned_ray_and_python() -> None:
    docker = load("cluster.yaml")["docker"]
    for key in ("head_image", "worker_image"):
        repo, tag = docker[key].split(":")
        assert repo == "rayproject/ray" and tag.startswith(f"{ray.__version__}-py311-"), docker[key]
    assert docker["worker_image"].endswith("-gpu")


def test_cluster_yaml_env_auth_dashboard_and_install() -> None:
    cfg = prepared(load("cluster.yaml"))
    run_env = " ".join(cfg["docker"]["run_options"])
    assert "MLFLOW_TRACKING_URI=http" in run_env  # every container on every node
    assert "RAY_AUTH_MODE=token" in run_env
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = next(c for c in cfg[key] if "ray start" in c)
        assert "RAY_AUTH_MODE=token" in start, key
    head_start = next(c for c in cfg["head_start_ray_commands"] if "ray start" in c)
    assert "--dashboard-host=127.0.0.1" in head_start and "0.0.0.0" not in head_start
    # the package is installed from the mounted repository with its own pins on head and workers
    for key in ("head_setup_commands", "worker_setup_commands"):
        assert any("pip install" in c and "/home/ray/stence" in c for c in cfg[key]), key
    assert "/home/ray/stence" in cfg["file_mounts"] and cfg["file_mounts"]["/home/ray/stence"] == "."
    assert {".venv", "runs"} <= set(cfg["rsync_exclude"])


def test_launcher_configs_give_nodes_credentials_by_mounted_file_only() -> None:
    """The nodes' MLflow user and Ray token come from the mounted, private ~/.stence-auth, never from a
    docker --env, a start command or a variable written by the config."""
    for rel, auth_dir in (("cluster.yaml", "/home/ray/.stence-auth"), ("cluster/onprem.yaml", "~/.stence-auth")):
        cfg = prepared(load(rel))
        assert cfg["file_mounts"][auth_dir] == "~/.stence-auth", rel
        setup = "\n".join(cfg["setup_commands"])
        assert f"chmod 700 {auth_dir}" in setup and f"chmod 600 {auth_dir}/*" in setup, rel
        assert f"ln -sfn {auth_dir}/mlflow-credentials" in setup and ".mlflow/credentials" in setup, rel
        text = (REPO / rel).read_text()
        commands = " ".join(str(c) for key in ("setup_commands", "head_start_ray_commands", "worker_start_ray_commands")
                            for c in cfg[key]) + " ".join(cfg.get("docker", {}).get("run_options", []))
        for secret in ("MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_USERNAME", "STENCE_SALT", "RAY_AUTH_TOKEN="):
            assert secret not in commands, (rel, secret)
        assert "get-auth-token --generate" not in text, rel  # leaves the token world-readable: stence cluster token


def test_validation_can_fail() -> None:
    """The validator used above is not a rubber stamp."""
    bad_head = load("cluster.yaml")
    bad_head["head_node_type"] = "no-such-type"
    with pytest.raises(ValueError, match="head_node_type"):
        prepared(bad_head)
    unknown_key = load("cluster.yaml")
    unknown_key["available_node_types"]["worker.gpu"]["gpus"] = 1
    with pytest.raises(jsonschema.ValidationError):
        prepared(unknown_key)
    too_many = load("cluster.yaml")
    too_many["available_node_types"]["worker.gpu"]["min_workers"] = too_many["max_workers"] + 1
    with pytest.raises(ValueError, match="max_workers"):
        prepared(too_many)


# --------------------------------------------------------------------------------------------------- onprem.yaml


def test_onprem_yaml_validates_like_ray_up() -> None:
    raw = load("cluster/onprem.yaml")
    assert raw["provider"]["type"] == "local"
    assert raw["provider"]["head_ip"] and raw["provider"]["worker_ips"]
    assert "available_node_types" not in raw and "head_node_type" not in raw
    cfg = prepared(raw)
    (node_type,) = cfg["available_node_types"].values()  # the local provider's single node type
    assert node_type["max_workers"] == len(raw["provider"]["worker_ips"])
    head_start = next(c for c in cfg["head_start_ray_commands"] if "ray start" in c)
    assert "--dashboard-host=127.0.0.1" in head_start and "RAY_AUTH_MODE=token" in head_start
    assert '"driver"' in head_start


def test_onprem_rejects_node_types() -> None:
    raw = load("cluster/onprem.yaml")
    raw["available_node_types"] = {"gpu": {"resources": {}, "node_config": {}}}
    with pytest.raises(Exception, match="available_node_types"):
        prepared(raw)


def test_onprem_env_file_command_writes_what_nodes_need(tmp_path: Path) -> None:
    """The setup command that writes ~/.stence-env really produces a sourceable file."""
    cmd = next(c for c in load("cluster/onprem.yaml")["setup_commands"] if ".stence-env" in c and "printf" in c)
    env = {"HOME": str(tmp_path), "PATH": os.environ["PATH"]}
    subprocess.run(["bash", "-c", cmd], env=env, check=True)
    out = subprocess.run(["bash", "-c", "source ~/.stence-env && env"], env=env, check=True,
                         capture_output=True, text=True).stdout
    values = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
    assert values["RAY_AUTH_MODE"] == "token"
    assert values["MLFLOW_TRACKING_URI"].startswith("http://")
    assert values["RAY_AUTH_TOKEN_PATH"] == f"{tmp_path}/.stence-auth/auth_token"


# --------------------------------------------------------------------------------------------------- KubeRay


def test_rayjob_manifest() -> None:
    docs = list(yaml.safe_load_all((REPO / "cluster/kuberay/rayjob.yaml").read_text()))
    job = next(d for d in docs if d["kind"] == "RayJob")
    assert job["apiVersion"] == "ray.io/v1" and job["metadata"]["name"]
    spec = job["spec"]
    argv = shlex.split(spec["entrypoint"])
    assert argv[:2] == ["stence", "tune"]
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert runtime_env["env_vars"]["MLFLOW_TRACKING_URI"].startswith("http://")
    assert sj.secret_env_names(runtime_env["env_vars"]) == []  # readable by every token holder
    assert spec["shutdownAfterJobFinishes"] is True

    cluster = spec["rayClusterSpec"]
    assert cluster["rayVersion"] == ray.__version__
    assert cluster["authOptions"]["mode"] == "token"
    pods = [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]
    for pod in pods:
        for c in pod["spec"]["containers"]:
            tag = c["image"].rsplit(":", 1)[1]
            assert f"ray{ray.__version__}-py311" in tag, c["image"]
    for g in cluster["workerGroupSpecs"]:
        assert g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]
    gpu_limits = [c["resources"]["limits"].get("nvidia.com/gpu") for g in cluster["workerGroupSpecs"]
                  for c in g["template"]["spec"]["containers"]]
    assert any(gpu_limits)
    # every Ray pod has the MLflow user in its own environment, from a Secret; nobody gets the salt
    for pod in pods:
        for c in pod["spec"]["containers"]:
            assert {"secretRef": {"name": "stence-mlflow-ray"}} in c.get("envFrom", []), c["name"]
    assert "STENCE_SALT" not in json.dumps(docs)  # (only the comments mention it)

    # storage: train.storage_path lies on a ReadWriteMany volume mounted in every pod (or on s3://)
    storage = next(a.split("=", 1)[1] for a in argv if a.startswith("train.storage_path="))
    if not storage.startswith("s3://"):
        pvc = next(d for d in docs if d["kind"] == "PersistentVolumeClaim")
        assert "ReadWriteMany" in pvc["spec"]["accessModes"]
        for pod in pods:
            claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod["spec"]["volumes"]
                      if "persistentVolumeClaim" in v}
            mounts = [m for c in pod["spec"]["containers"] for m in c["volumeMounts"]
                      if claims.get(m["name"]) == pvc["metadata"]["name"]]
            assert any(storage.startswith(m["mountPath"]) for m in mounts)


def test_kuberay_image_is_built_on_the_pinned_ray() -> None:
    text = (REPO / "cluster/kuberay/Dockerfile").read_text()
    base = next(line.split()[1] for line in text.splitlines() if line.startswith("FROM "))
    assert base == f"rayproject/ray:{ray.__version__}-py311-gpu"
    assert "pip install" in text and "/home/ray/stence" in text


# --------------------------------------------------------------------------------------------------- MLflow server


def test_mlflow_kubernetes_manifest() -> None:
    docs = {d["kind"]: d for d in yaml.safe_load_all((REPO / "cluster/mlflow/k8s.yaml").read_text())}
    assert {"Deployment", "Service", "Secret"} <= set(docs)
    dep, svc = docs["Deployment"], docs["Service"]
    assert dep["apiVersion"] == "apps/v1"
    assert dep["spec"]["selector"]["matchLabels"].items() <= dep["spec"]["template"]["metadata"]["labels"].items()
    assert svc["spec"]["selector"].items() <= dep["spec"]["template"]["metadata"]["labels"].items()
    assert svc["spec"]["type"] == "ClusterIP"
    (container,) = dep["spec"]["template"]["spec"]["containers"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/health"
    assert {e["secretRef"]["name"] for e in container["envFrom"]} == {docs["Secret"]["metadata"]["name"]}
    secret = docs["Secret"]["stringData"]
    assert secret["MLFLOW_BACKEND_STORE_URI"].startswith("postgresql")
    assert secret["MLFLOW_AUTH_DATABASE_URI"] != secret["MLFLOW_BACKEND_STORE_URI"]
    assert not CREDENTIAL_IN_URI.search(secret["MLFLOW_BACKEND_STORE_URI"] + secret["MLFLOW_AUTH_DATABASE_URI"])
    assert secret["PGPASSWORD"] and secret["MLFLOW_AUTH_ADMIN_PASSWORD"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["MLFLOW_BASIC_AUTH"] == "1" and env["MLFLOW_AUTH_DEFAULT_PERMISSION"] == "NO_PERMISSIONS"
    rayjob = next(d for d in yaml.safe_load_all((REPO / "cluster/kuberay/rayjob.yaml").read_text())
                  if d["kind"] == "RayJob")
    uri = yaml.safe_load(rayjob["spec"]["runtimeEnvYAML"])["env_vars"]["MLFLOW_TRACKING_URI"]
    host = uri.split("//")[1].split(":")[0]
    assert host == env["MLFLOW_PUBLIC_HOST"]  # the name the Ray pods use is on the allow-list
    assert host.startswith(f"{svc['metadata']['name']}.{svc['metadata']['namespace']}.")


def test_systemd_unit_runs_serve_sh_unprivileged() -> None:
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.read_string((REPO / "cluster/mlflow/stence-mlflow.service").read_text())
    svc = unit["Service"]
    assert svc["ExecStart"].endswith("cluster/mlflow/serve.sh")
    assert svc["User"] not in ("", "root") and svc["EnvironmentFile"]
    assert unit["Install"]["WantedBy"] == "multi-user.target"
    example = (REPO / "cluster/mlflow/mlflow.env.example").read_text()
    for var in ("MLFLOW_BACKEND_STORE_URI", "MLFLOW_ARTIFACTS_DESTINATION", "MLFLOW_PUBLIC_HOST",
                "MLFLOW_AUTH_DATABASE_URI"):
        assert f"\n{var}=" in example
    # the passwords come as systemd credentials (private copies only the service reads), not in the env file
    text = (REPO / "cluster/mlflow/stence-mlflow.service").read_text()
    assert "LoadCredential=db-password:" in text and "MLFLOW_DB_PASSWORD_FILE=%d/db-password" in text
    assert "MLFLOW_AUTH_ADMIN_PASSWORD_FILE=%d/admin-password" in text
    assert "MLFLOW_BASIC_AUTH=0" not in example and not CREDENTIAL_IN_URI.search(example)


FAKE_MLFLOW = """#!/usr/bin/env bash
# stands in for mlflow: reports its argv and the store/auth variables serve.sh hands it, then exits
python3 - "$@" <<'PY'
import json, os, sys
keys = ("MLFLOW_BACKEND_STORE_URI", "MLFLOW_AUTH_CONFIG_PATH", "PGPASSWORD", "MLFLOW_AUTH_ADMIN_PASSWORD")
print(json.dumps({"argv": sys.argv[1:], "env": {k: os.environ.get(k) for k in keys}}))
PY
"""


def serve(tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    """serve.sh with only `env` set and a fake mlflow that prints what it was given (JSON on stdout)."""
    fake = tmp_path / "fake-mlflow"
    if not fake.exists():
        fake.write_text(FAKE_MLFLOW)
        fake.chmod(0o755)
    base = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "MLFLOW_BIN": str(fake),
            "MLFLOW_STATE_DIR": str(tmp_path / "state")}
    return subprocess.run(["bash", str(REPO / "cluster/mlflow/serve.sh")], env={**base, **env},
                          capture_output=True, text=True, timeout=30)


def launched(r: subprocess.CompletedProcess) -> tuple[list[str], dict[str, str], dict[str, str | None]]:
    """(argv, {--option: value}, env) of the mlflow serve.sh exec'd."""
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    argv = out["argv"]
    return argv, {a: argv[i + 1] for i, a in enumerate(argv[:-1]) if a.startswith("--")}, out["env"]


PG = "postgresql+psycopg2://u:p4ssw0rd@db:5432/mlflow"


def test_serve_sh_refuses_an_open_or_leaky_server(tmp_path: Path) -> None:
    art = str(tmp_path / "artifacts")
    ok = {"MLFLOW_BACKEND_STORE_URI": PG, "MLFLOW_ARTIFACTS_DESTINATION": art}
    assert "MLFLOW_BACKEND_STORE_URI" in serve(tmp_path).stderr
    r = serve(tmp_path, MLFLOW_BACKEND_STORE_URI="sqlite:////tmp/x.db", MLFLOW_ARTIFACTS_DESTINATION=art)
    assert r.returncode != 0 and "PostgreSQL" in r.stderr
    # authentication is on unless turned off: it needs its own database
    r = serve(tmp_path, **ok)
    assert r.returncode != 0 and "MLFLOW_AUTH_DATABASE_URI" in r.stderr
    r = serve(tmp_path, **ok, MLFLOW_AUTH_DATABASE_URI=PG)
    assert r.returncode != 0 and "differ" in r.stderr
    # off only on a loopback address, with a warning; never for a server the nodes reach
    for host in ("0.0.0.0", "10.0.0.10", "mlflow.internal"):
        r = serve(tmp_path, **ok, MLFLOW_BASIC_AUTH="0", MLFLOW_HOST=host)
        assert r.returncode != 0 and "loopback" in r.stderr, host
    argv, opt, _ = launched(serve(tmp_path, **ok, MLFLOW_BASIC_AUTH="0"))
    assert "--app-name" not in opt and opt["--host"] == "127.0.0.1"
    assert "WARNING: authentication is OFF" in serve(tmp_path, **ok, MLFLOW_BASIC_AUTH="0").stderr
    auth = {**ok, "MLFLOW_AUTH_DATABASE_URI": PG + "_auth"}
    for permission in ("EDIT", "MANAGE", "USE", "bogus"):
        r = serve(tmp_path, **auth, MLFLOW_AUTH_DEFAULT_PERMISSION=permission)
        assert r.returncode != 0 and "MLFLOW_AUTH_DEFAULT_PERMISSION" in r.stderr, permission
    # no store URI or credential through the extra arguments
    for extra in ("--backend-store-uri postgresql://x", "--registry-store-uri=x", "--app-name basic-auth",
                  "--gunicorn-opts postgresql://u:pw@h/db"):
        r = serve(tmp_path, **auth, MLFLOW_SERVER_EXTRA_ARGS=extra)
        assert r.returncode != 0 and "MLFLOW_SERVER_EXTRA_ARGS" in r.stderr, extra
    # a password file others can read is refused
    pw = tmp_path / "db.password"
    pw.write_text("s3cret-db-pass\n")
    pw.chmod(0o644)
    r = serve(tmp_path, **auth, MLFLOW_DB_PASSWORD_FILE=str(pw))
    assert r.returncode != 0 and "chmod 600" in r.stderr


def test_serve_sh_command_line_holds_no_password(tmp_path: Path) -> None:
    art = str(tmp_path / "artifacts")
    r = serve(tmp_path, MLFLOW_BACKEND_STORE_URI=PG, MLFLOW_ARTIFACTS_DESTINATION=art, MLFLOW_PUBLIC_HOST="mlflow.x",
              MLFLOW_AUTH_DATABASE_URI=PG + "_auth", MLFLOW_AUTH_ADMIN_PASSWORD="admin-pass-123")
    argv, opt, env = launched(r)
    assert argv[0] == "server" and "--backend-store-uri" not in opt
    assert not any("p4ssw0rd" in a or "admin-pass" in a for a in argv)  # argv is world-readable in /proc
    assert env["MLFLOW_BACKEND_STORE_URI"] == PG  # mlflow's --backend-store-uri reads it from here
    assert env["MLFLOW_AUTH_ADMIN_PASSWORD"] == "admin-pass-123"
    assert opt["--artifacts-destination"] == art and Path(art).is_dir() and "--serve-artifacts" in argv
    assert opt["--host"] == "127.0.0.1"  # not exposed unless asked
    assert {"mlflow.x", "mlflow.x:*", "localhost:*"} <= set(opt["--allowed-hosts"].split(","))
    assert opt["--app-name"] == "basic-auth"
    ini_path = Path(env["MLFLOW_AUTH_CONFIG_PATH"])
    ini = configparser.ConfigParser(interpolation=None)
    ini.read(ini_path)
    assert ini["mlflow"]["database_uri"] == PG + "_auth"
    assert ini["mlflow"]["default_permission"] == "NO_PERMISSIONS" and ini["mlflow"]["admin_username"] == "admin"
    assert "admin_password" not in ini["mlflow"]
    assert oct(ini_path.stat().st_mode & 0o777) == "0o600" and oct(ini_path.parent.stat().st_mode & 0o777) == "0o700"

    # the password from a private file, handed to libpq as PGPASSWORD; URIs without any password
    pw = tmp_path / "db.password"
    pw.write_text("s3cret-db-pass\n")
    pw.chmod(0o600)
    admin = tmp_path / "admin.password"
    admin.write_text("admin-pass-456\n")
    admin.chmod(0o400)
    bare = "postgresql+psycopg2://mlflow@db:5432/mlflow"
    argv, opt, env = launched(serve(tmp_path, MLFLOW_BACKEND_STORE_URI=bare, MLFLOW_ARTIFACTS_DESTINATION=art,
                                    MLFLOW_AUTH_DATABASE_URI=bare + "_auth", MLFLOW_DB_PASSWORD_FILE=str(pw),
                                    MLFLOW_AUTH_ADMIN_PASSWORD_FILE=str(admin)))
    assert env["PGPASSWORD"] == "s3cret-db-pass" and env["MLFLOW_AUTH_ADMIN_PASSWORD"] == "admin-pass-456"
    assert not any("s3cret" in a or "admin-pass" in a for a in argv)
    assert "s3cret" not in Path(env["MLFLOW_AUTH_CONFIG_PATH"]).read_text()


def _env_file(path: Path) -> dict[str, str]:
    lines = [ln.strip() for ln in path.read_text().splitlines()]
    return dict(ln.split("=", 1) for ln in lines if ln and not ln.startswith("#"))


def test_shipped_server_configs_start_closed(tmp_path: Path) -> None:
    """serve.sh given the env example (as systemd would, with its credential files) and given the
    Kubernetes Secret + container env: both start with users and permissions, bound for the nodes."""
    pw = tmp_path / "db-password"
    pw.write_text("s3cret-db-pass\n")
    pw.chmod(0o400)
    example = _env_file(REPO / "cluster/mlflow/mlflow.env.example")
    example.update({"MLFLOW_DB_PASSWORD_FILE": str(pw), "MLFLOW_AUTH_ADMIN_PASSWORD_FILE": str(pw)})
    del example["MLFLOW_BIN"]
    argv, opt, env = launched(serve(tmp_path, **example))
    assert opt["--host"] == "0.0.0.0" and opt["--app-name"] == "basic-auth"
    assert env["PGPASSWORD"] == "s3cret-db-pass"

    docs = {d["kind"]: d for d in yaml.safe_load_all((REPO / "cluster/mlflow/k8s.yaml").read_text())}
    (container,) = docs["Deployment"]["spec"]["template"]["spec"]["containers"]
    k8s_env = {**docs["Secret"]["stringData"], **{e["name"]: e["value"] for e in container["env"]}}
    k8s_env.update({"MLFLOW_STATE_DIR": str(tmp_path / "k8s-state"), "PGPASSWORD": "k8s-db-secret"})
    argv, opt, env = launched(serve(tmp_path, **k8s_env))
    assert opt["--host"] == "0.0.0.0" and opt["--app-name"] == "basic-auth"
    assert env["PGPASSWORD"] == "k8s-db-secret" and not any("k8s-db-secret" in a for a in argv)


# --------------------------------------------------------------------------------------------------- job submission


def test_runtime_env_passes_the_uri_and_no_secret() -> None:
    environ = {"MLFLOW_TRACKING_URI": "http://mlflow.x:5000", "STENCE_SALT": "s", "HOME": "/root", "AWS_SECRET": "no",
               "MLFLOW_TRACKING_USERNAME": "alice", "MLFLOW_TRACKING_PASSWORD": "pw", "RAY_AUTH_TOKEN": "t"}
    env = sj.build_runtime_env(REPO, environ=environ, extra_env={"X": "1"})
    assert env["working_dir"] == str(REPO)
    assert env["env_vars"] == {"MLFLOW_TRACKING_URI": "http://mlflow.x:5000", "X": "1",
                               "MLFLOW_DISABLE_TELEMETRY": "true"}
    assert sj.held_back(environ) == ["MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "STENCE_SALT"]
    # --env cannot smuggle a secret in either: the runtime env is readable through the Jobs API
    for name in ("STENCE_SALT", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_USERNAME", "RAY_AUTH_TOKEN",
                 "AWS_SECRET_ACCESS_KEY", "HF_TOKEN", "DB_PASSWORD", "OPENAI_API_KEY"):
        with pytest.raises(sj.SubmitError, match="readable by everyone holding the cluster's token"):
            sj.build_runtime_env(REPO, environ={}, extra_env={name: "x"})
    assert {".env", "*.env"} <= set(env["excludes"])
    assert {"runs/", ".venv/"} <= set(env["excludes"])
    assert "pip" not in env and "py_executable" not in env
    assert sj.build_runtime_env(REPO, environ={}, py_executable="/opt/py")["py_executable"] == "/opt/py"
    with pytest.raises(sj.SubmitError):
        sj.build_runtime_env(REPO, environ={}, pip=["x"], py_executable="/opt/py")


def test_pinned_pip_list_is_the_package_pins() -> None:
    env = sj.build_runtime_env(REPO, environ={}, pip=sj.pinned_requirements())
    packages = env["pip"]["packages"]
    assert f"ray[default,train,tune]=={ray.__version__}" in packages
    assert "mlflow==3.17.2" in packages and "torch==2.13.0" in packages


def test_entrypoint_quoting_and_stence_rewrite() -> None:
    script = "import sys\nprint('a b', sys.argv)"
    assert shlex.split(sj.build_entrypoint(["python", "-c", script])) == ["python", "-c", script]
    argv = ["stence", "tune", "--space", "smoke", "--set", "data.cohort=/a b/c"]
    assert shlex.split(sj.build_entrypoint(argv)) == ["python", "-m", "stence.cli", *argv[1:]]
    assert shlex.split(sj.build_entrypoint(argv, "/opt/py"))[:3] == ["/opt/py", "-m", "stence.cli"]
    with pytest.raises(sj.SubmitError):
        sj.build_entrypoint([])


def test_address_and_env_pairs() -> None:
    assert sj.resolve_address(None, {}) == "http://127.0.0.1:8265"
    assert sj.resolve_address(None, {"RAY_ADDRESS": "10.0.0.1:6379"}) == "http://127.0.0.1:8265"
    assert sj.resolve_address(None, {"RAY_ADDRESS": "http://h:8265/"}) == "http://h:8265"
    assert sj.resolve_address("http://a:1", {"RAY_API_SERVER_ADDRESS": "http://b:2"}) == "http://a:1"
    with pytest.raises(sj.SubmitError):
        sj.resolve_address("a:6379", {})
    assert sj.parse_env_pairs(["A=1", "B=x=y", "C="]) == {"A": "1", "B": "x=y", "C": ""}
    with pytest.raises(sj.SubmitError):
        sj.parse_env_pairs(["NOVALUE"])


def test_auth_problems(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.ray/auth_token here
    assert len(sj.auth_problems({})) == 2
    token = tmp_path / "tok"
    token.write_text("t")
    assert sj.auth_problems({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}) == []
    assert sj.auth_problems({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "t"}) == []
    assert len(sj.auth_problems({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(tmp_path / "no")})) == 1


def test_token_is_created_and_kept_private(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from stence.cluster.ray_token import TokenError, check_token_file, ensure_token

    monkeypatch.setenv("HOME", str(tmp_path))
    path, done = ensure_token(tmp_path / ".ray" / "auth_token", tmp_path / ".stence-auth")
    token = path.read_text()
    assert len(token) >= 32 and oct(path.stat().st_mode & 0o777) == "0o600"
    copy = tmp_path / ".stence-auth" / "auth_token"
    assert copy.read_text() == token and oct(copy.stat().st_mode & 0o777) == "0o600"
    assert oct(copy.parent.stat().st_mode & 0o777) == "0o700"
    assert token not in " ".join(done)
    # an existing token is kept, a readable one (what `ray get-auth-token --generate` writes) made private
    path.chmod(0o644)
    assert ensure_token(path, None)[0].read_text() == token and oct(path.stat().st_mode & 0o777) == "0o600"
    path.chmod(0o640)
    warning = check_token_file(path)
    assert warning and "now 600" in warning and token not in warning
    assert check_token_file(path) is None
    if os.geteuid() == 0:  # someone else's readable token is refused, not changed
        path.chmod(0o644)
        os.chown(path, 65534, -1)
        with pytest.raises(TokenError, match="not yours"):
            check_token_file(path)
        assert oct(path.stat().st_mode & 0o777) == "0o644"


def test_cli_token_and_client_check_never_print_the_token(tmp_path: Path) -> None:
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("RAY_")}, "HOME": str(tmp_path)}
    r = subprocess.run([sys.executable, "-m", "stence.cli", "cluster", "token"], env=env, cwd=REPO,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    token_file = tmp_path / ".ray" / "auth_token"
    token = token_file.read_text()
    assert token not in r.stdout + r.stderr
    assert oct(token_file.stat().st_mode & 0o777) == "0o600"
    assert (tmp_path / ".stence-auth" / "auth_token").read_text() == token
    # every `stence cluster` command makes a readable token file private first (and says so)
    token_file.chmod(0o644)
    r = subprocess.run([sys.executable, "-m", "stence.cli", "cluster", "list", "--address", "http://127.0.0.1:9"],
                       env={**env, "RAY_AUTH_MODE": "token"}, cwd=REPO, capture_output=True, text=True,
                       timeout=120)
    assert "was readable by other users" in r.stderr and token not in r.stdout + r.stderr
    assert oct(token_file.stat().st_mode & 0o777) == "0o600"


def test_ray_packages_the_working_dir_without_runs_venv_or_ignored_files(tmp_path: Path) -> None:
    """Ray's own working_dir packager, given our excludes, on a project laid out like this repo."""
    from ray._private.runtime_env.packaging import create_package

    proj = tmp_path / "proj"
    for rel in ("stence/cli.py", "runs/ray/ckpt.pt", ".venv/lib/x.py", "data/big.bin", "mlflow.db",
                "stence/__pycache__/cli.cpython-311.pyc", "cluster/submit.py"):
        (proj / rel).parent.mkdir(parents=True, exist_ok=True)
        (proj / rel).write_text("x")
    (proj / ".gitignore").write_text("data/\n")
    env = sj.build_runtime_env(proj, environ={})
    zip_path = tmp_path / "pkg.zip"
    create_package(str(proj), zip_path, include_gitignore=True, excludes=env["excludes"])
    names = {n for n in zipfile.ZipFile(zip_path).namelist() if not n.endswith("/")}
    assert names == {"stence/cli.py", "cluster/submit.py", ".gitignore"}


def test_cli_help_and_bad_input() -> None:
    from stence.cli import build_parser

    parser = build_parser()
    args = parser.parse_args(["cluster", "submit", "--env", "A=1", "--driver-resource", "driver=1", "--",
                              "stence", "tune", "--space", "smoke", "--set", "x=1"])
    assert args.job_command[-5:] == ["tune", "--space", "smoke", "--set", "x=1"]
    assert args.env == ["A=1"] and args.driver_resource == ["driver=1"]
    for action in ("status", "logs", "stop"):
        assert parser.parse_args(["cluster", action, "raysubmit_x"]).job_id == "raysubmit_x"
    assert args.func(parser.parse_args(["cluster", "submit", "--env", "BROKEN"])) == 1
    assert args.func(parser.parse_args(["cluster", "submit", "--env", "STENCE_SALT=x", "--", "stence", "tune"])) == 1
    assert parser.parse_args(["cluster", "user", "grant", "bob", "--model", "m", "--permission", "edit"]).permission == "EDIT"
