"""The repository's top-level tune/ and cluster/ folders install only as stence.tune and stence.cluster: no
site-wide package named `tune` or `cluster`, and a Ray job's working_dir carries them under stence/."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

from stence.cluster import submit as sj

REPO = Path(__file__).resolve().parents[1]


def test_tune_and_cluster_are_not_top_level_packages(tmp_path: Path) -> None:
    probe = (
        "import importlib.util as u, json\n"
        "import stence.tune.sweep, stence.cluster.submit, stence.tune.spaces as s\n"
        "print(json.dumps({'tune': u.find_spec('tune') is not None, 'cluster': u.find_spec('cluster') is not None,\n"
        "  'sweep': stence.tune.sweep.__file__, 'submit': stence.cluster.submit.__file__,\n"
        "  'space': s.load_space('default').stem}))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    import json

    seen = json.loads(r.stdout.strip().splitlines()[-1])
    assert seen["tune"] is False and seen["cluster"] is False  # nothing named tune/cluster was installed
    assert Path(seen["sweep"]).resolve() == REPO / "tune" / "sweep.py"  # the top-level folder is the code
    assert Path(seen["submit"]).resolve() == REPO / "cluster" / "submit.py"
    assert seen["space"] == "default"  # package data found under the namespaced name


def test_a_ray_working_dir_carries_stence_tune(tmp_path: Path) -> None:
    """Ray's own packager on a project laid out like this one: the job imports stence.tune from the upload."""
    from ray._private.runtime_env.packaging import create_package

    proj = tmp_path / "proj"
    for rel, text in (("stence/__init__.py", ""), ("tune/__init__.py", ""), ("tune/probe_mod.py", "X = 7\n"),
                      ("cluster/__init__.py", "")):
        (proj / rel).parent.mkdir(parents=True, exist_ok=True)
        (proj / rel).write_text(text)
    (proj / "stence" / "tune").symlink_to("../tune")
    (proj / "stence" / "cluster").symlink_to("../cluster")
    env = sj.build_runtime_env(proj, environ={})
    zip_path = tmp_path / "pkg.zip"
    create_package(str(proj), zip_path, include_gitignore=True, excludes=env["excludes"])
    names = set(zipfile.ZipFile(zip_path).namelist())
    assert "stence/tune/probe_mod.py" in names and "tune/probe_mod.py" in names
    job = tmp_path / "job"
    zipfile.ZipFile(zip_path).extractall(job)
    r = subprocess.run([sys.executable, "-c", "import stence.tune.probe_mod as m; print(m.X, m.__file__)"],
                       cwd=job, env={**os.environ, "PYTHONPATH": str(job)}, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    value, path = r.stdout.split()
    assert value == "7" and Path(path).is_relative_to(job)


def test_the_links_are_in_the_repository() -> None:
    for name in ("tune", "cluster"):
        link = REPO / "stence" / name
        assert link.is_symlink() and os.readlink(link) == f"../{name}"
