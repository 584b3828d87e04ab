"""Offline checks of the cluster files: launcher configs validated the way `ray up` does, the KubeRay
RayJob and MLflow manifests, serve.sh's refusals, and the job runtime environment `stence cluster submit`
builds (packaged by Ray's own working_dir code)."""

from __future__ import annotations

import configparser
import copy
import os
import shlex
import subprocess
import zipfile
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from cluster import submit as sj

REPO = Path(__file__).resolve().parents[1]
PINS = {d.split("==")[0].split("[")[0]: d.split("==")[1] for d in sj.pinned_requirements() if "==" in d}


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
    env = {e["name"]: e.get("value") for e in container["env"]}
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
    for var in ("MLFLOW_BACKEND_STORE_URI", "MLFLOW_ARTIFACTS_DESTINATION", "MLFLOW_PUBLIC_HOST"):
        assert f"\n{var}=" in example


def serve(tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    """serve.sh with only `env` set; MLFLOW_BIN=true so a configuration it accepts exits 0 at once."""
    base = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "MLFLOW_BIN": "echo",
            "MLFLOW_STATE_DIR": str(tmp_path / "state")}
    return subprocess.run(["bash", str(REPO / "cluster/mlflow/serve.sh")], env={**base, **env},
                          capture_output=True, text=True, timeout=30)


def test_serve_sh_refusals_and_command_line(tmp_path: Path) -> None:
    pg = "postgresql+psycopg2://u:p@db:5432/mlflow"
    art = str(tmp_path / "artifacts")
    assert "MLFLOW_BACKEND_STORE_URI" in serve(tmp_path).stderr
    r = serve(tmp_path, MLFLOW_BACKEND_STORE_URI="sqlite:////tmp/x.db", MLFLOW_ARTIFACTS_DESTINATION=art)
    assert r.returncode != 0 and "PostgreSQL" in r.stderr
    r = serve(tmp_path, MLFLOW_BACKEND_STORE_URI=pg, MLFLOW_ARTIFACTS_DESTINATION=art, MLFLOW_BASIC_AUTH="1")
    assert r.returncode != 0 and "MLFLOW_AUTH_DATABASE_URI" in r.stderr
    r = serve(tmp_path, MLFLOW_BACKEND_STORE_URI=pg, MLFLOW_ARTIFACTS_DESTINATION=art, MLFLOW_BASIC_AUTH="1",
              MLFLOW_AUTH_DATABASE_URI=pg)
    assert r.returncode != 0 and "differ" in r.stderr

    # accepted: MLFLOW_BIN=echo prints the command line serve.sh would exec
    r = serve(tmp_path, MLFLOW_BACKEND_STORE_URI=pg, MLFLOW_ARTIFACTS_DESTINATION=art, MLFLOW_PUBLIC_HOST="mlflow.x",
              MLFLOW_BASIC_AUTH="1", MLFLOW_AUTH_DATABASE_URI=pg + "_auth")
    assert r.returncode == 0, r.stderr
    argv = shlex.split(r.stdout)
    opt = {a: argv[i + 1] for i, a in enumerate(argv[:-1]) if a.startswith("--")}
    assert argv[0] == "server" and opt["--backend-store-uri"] == pg
    assert opt["--artifacts-destination"] == art and Path(art).is_dir()
    assert opt["--host"] == "127.0.0.1"  # not exposed unless asked
    assert {"mlflow.x", "mlflow.x:*", "localhost:*"} <= set(opt["--allowed-hosts"].split(","))
    assert opt["--app-name"] == "basic-auth"
    ini = (tmp_path / "state" / "basic_auth.ini").read_text()
    assert f"database_uri = {pg}_auth" in ini
    assert oct((tmp_path / "state" / "basic_auth.ini").stat().st_mode & 0o777) == "0o600"


# --------------------------------------------------------------------------------------------------- job submission


def test_runtime_env_passes_through_tracking_and_salt() -> None:
    environ = {"MLFLOW_TRACKING_URI": "http://mlflow.x:5000", "STENCE_SALT": "s", "HOME": "/root", "AWS_SECRET": "no"}
    env = sj.build_runtime_env(REPO, environ=environ, extra_env={"STENCE_SALT": "override", "X": "1"})
    assert env["working_dir"] == str(REPO)
    assert env["env_vars"] == {"MLFLOW_TRACKING_URI": "http://mlflow.x:5000", "STENCE_SALT": "override",
                               "X": "1", "MLFLOW_DISABLE_TELEMETRY": "true"}
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
