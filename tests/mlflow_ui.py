"""A real `mlflow server` on a test's store, and headless Chromium (Debian's package) reading its UI pages.

Chromium is driven over its DevTools protocol (a websocket, through aiohttp, which Ray already installs):
open a page, let its scripts run, expand folded nested runs the way a user clicks the "+" beside a
parent run, then read the page's text and, if asked, save a screenshot.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# the "+" button MLflow draws beside a parent run whose nested runs are folded (a "-" once unfolded)
_EXPAND_JS = """(() => { document.querySelectorAll('button[data-component-id*="runnamecellrenderer"]').forEach(x => {
  if (!x.getAttribute('data-stence-clicked')) { x.setAttribute('data-stence-clicked', '1'); x.click(); } }); })()"""


# the assistant side panel MLflow opens on first visit (closed so that screenshots show the runs)
_CLOSE_PANEL_JS = """(() => { document.querySelectorAll('[aria-label="Close"]').forEach(x => x.click()); })()"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()


def _wait_http(url: str, what: str, log: Path | None = None, tries: int = 120) -> bytes:
    for _ in range(tries):
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                return r.read()
        except OSError:
            time.sleep(0.5)
    tail = log.read_text()[-2000:] if log and log.exists() else ""
    raise RuntimeError(f"{what} did not answer at {url}\n{tail}")


@contextlib.contextmanager
def mlflow_server(store_uri: str, workdir: Path) -> Iterator[str]:
    """`mlflow server` on `store_uri` (artifacts where the runs recorded them); yields its base URL."""
    port, log_path = _free_port(), workdir / "mlflow_server.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([str(Path(sys.executable).with_name("mlflow")), "server", "--backend-store-uri",
                                 store_uri, "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                                stdout=log, stderr=subprocess.STDOUT)
        try:
            base = f"http://127.0.0.1:{port}"
            _wait_http(f"{base}/health", "mlflow server", log_path)
            yield base
        finally:
            _stop(proc)


@contextlib.contextmanager
def chromium() -> Iterator[str]:
    """Headless Chromium with the DevTools protocol on a free port; yields the page target's websocket URL."""
    assert CHROMIUM, "chromium is not installed (cluster/ci_install.sh installs Debian's package)"
    port = _free_port()
    with tempfile.TemporaryDirectory() as profile:
        proc = subprocess.Popen([CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
                                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                                 f"--user-data-dir={profile}", f"--remote-debugging-port={port}",
                                 "--window-size=1500,800", "about:blank"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            targets = json.loads(_wait_http(f"http://127.0.0.1:{port}/json/list", "chromium"))
            yield next(t["webSocketDebuggerUrl"] for t in targets if t.get("type") == "page")
        finally:
            _stop(proc)
            _wait_group_gone(proc)  # its helper processes still write into the profile until they exit


def _wait_group_gone(proc: subprocess.Popen, grace_s: float = 20.0) -> None:
    """Wait until every process of `proc`'s process group has exited: SIGKILL after `grace_s`, and give up
    (a zombie no one reaps) 10 s later."""
    proc.wait()
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline + 10.0:
        try:
            os.killpg(proc.pid, signal.SIGKILL if time.monotonic() > deadline else 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)


async def _visit(ws_url: str, url: str, expect: Sequence[str], timeout_s: float, expand: bool,
                 screenshot: Path | None) -> str:
    import aiohttp

    async with aiohttp.ClientSession() as session, session.ws_connect(ws_url, max_msg_size=0) as ws:
        ids = iter(range(1, 100_000))

        async def call(method: str, **params) -> dict:
            i = next(ids)
            await ws.send_json({"id": i, "method": method, "params": params})
            async for msg in ws:
                data = json.loads(msg.data)
                if data.get("id") == i:
                    return data.get("result", {})
            raise RuntimeError("chromium closed the connection")

        async def text() -> str:
            r = await call("Runtime.evaluate", expression="document.body ? document.body.innerText : ''",
                           returnByValue=True)
            return str(r.get("result", {}).get("value", ""))

        await call("Page.enable")
        await call("Page.navigate", url=url)
        deadline = time.monotonic() + timeout_s
        page = ""
        while time.monotonic() < deadline:  # the UI fetches its runs after load: wait for what must show
            await asyncio.sleep(1.0)
            await call("Runtime.evaluate", expression=_CLOSE_PANEL_JS)
            if expand:
                await call("Runtime.evaluate", expression=_EXPAND_JS)
            page = await text()
            if all(e in page for e in expect):
                break
        if screenshot is not None:
            await asyncio.sleep(1.0)
            shot = await call("Page.captureScreenshot", format="png")
            screenshot.write_bytes(base64.b64decode(shot["data"]))
        return page


def page_text(ws_url: str, url: str, expect: Sequence[str] = (), *, timeout_s: float = 60.0,
              expand: bool = False, screenshot: Path | None = None) -> str:
    """The visible text of `url` once every string of `expect` shows (or `timeout_s` passed), with folded
    nested runs unfolded when `expand` is set."""
    return asyncio.run(_visit(ws_url, url, tuple(expect), timeout_s, expand, screenshot))


def runs_page(base: str, experiment_id: str, search: str = "") -> str:
    q = f"?searchFilter={urllib.parse.quote(search)}" if search else ""
    return f"{base}/#/experiments/{experiment_id}/runs{q}"


def artifacts_page(base: str, experiment_id: str, run_id: str) -> str:
    return f"{base}/#/experiments/{experiment_id}/runs/{run_id}/artifacts"
