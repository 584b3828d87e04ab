"""A real `mlflow server` on a test's store and headless Chromium (Debian's package) reading its UI pages."""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
_FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
          "--disable-component-update", "--disable-sync", "--virtual-time-budget=20000"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def mlflow_server(store_uri: str, workdir: Path) -> Iterator[str]:
    """`mlflow server` on `store_uri` (artifacts as the runs recorded them); yields its base URL."""
    port = _free_port()
    log = open(workdir / "mlflow_server.log", "w")  # noqa: SIM115 - closed below
    mlflow_bin = Path(sys.executable).with_name("mlflow")
    proc = subprocess.Popen([str(mlflow_bin), "server", "--backend-store-uri", store_uri, "--host", "127.0.0.1",
                             "--port", str(port), "--workers", "1"], stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(120):
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(0.5)
        else:
            raise RuntimeError(f"mlflow server did not start: {(workdir / 'mlflow_server.log').read_text()[-2000:]}")
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def runs_page(base: str, experiment_id: str, search: str = "") -> str:
    q = f"?searchFilter={urllib.parse.quote(search)}" if search else ""
    return f"{base}/#/experiments/{experiment_id}/runs{q}"


def artifacts_page(base: str, experiment_id: str, run_id: str) -> str:
    return f"{base}/#/experiments/{experiment_id}/runs/{run_id}/artifacts"


def rendered(url: str, screenshot: Path | None = None) -> str:
    """The page's DOM after its scripts ran (and a 1500 x 800 screenshot if asked)."""
    assert CHROMIUM, "chromium is not installed (cluster/ci_install.sh installs Debian's package)"
    dom = subprocess.run([CHROMIUM, *_FLAGS, "--dump-dom", url], capture_output=True, text=True, timeout=120).stdout
    if screenshot is not None:
        subprocess.run([CHROMIUM, *_FLAGS, "--window-size=1500,800", f"--screenshot={screenshot}", url],
                       capture_output=True, timeout=120, check=True)
    return dom
