"""`stence ui`: the MLflow UI (`mlflow server`) on the local SQLite tracking store, artifacts beside the
database, run in its own process group until it exits or is interrupted."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote

from stence.config import Config
from stence.tracking.client import resolve_tracking_uri

SQLITE = "sqlite:///"


@dataclass
class UiServer:
    """The tracking URI, and for a local store the server command; `returncode` once it has run."""

    uri: str
    host: str
    port: int
    cmd: list[str] = field(default_factory=list)
    returncode: int | None = None

    @property
    def local(self) -> bool:
        """A local SQLite store (a tracking server serves its own UI)."""
        return self.uri.startswith(SQLITE)


def _database(uri: str) -> Path:
    return Path(unquote(uri[len(SQLITE):].split("?", 1)[0]))


def server_command(uri: str, host: str, port: int, allowed_hosts: str | None = None) -> list[str]:
    """`mlflow server` on a SQLite store, artifacts beside the database (as `tracking.artifact_location`)."""
    artifacts = (_database(uri).parent / "mlartifacts").as_uri()
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri,
           "--default-artifact-root", artifacts, "--artifacts-destination", artifacts,
           "--host", host, "--port", str(port), "--workers", "1"]
    if allowed_hosts:
        cmd += ["--allowed-hosts", allowed_hosts]
    return cmd


def mlflow_ui(cfg: Config, host: str, port: int, allowed_hosts: str | None = None, *, dry_run: bool = False,
              on_start: Callable[[UiServer], None] | None = None) -> UiServer:
    """The UI of the configured tracking store: nothing to run for a remote store (`local` False), only the
    command with `dry_run`; else the database's folder is created, `on_start(server)` called, and the server
    run until it exits or Ctrl-C / SIGTERM (`returncode`, 0 after an interrupt)."""
    uri = resolve_tracking_uri(cfg)
    server = UiServer(uri, host, port)
    if not server.local:
        return server
    server.cmd = server_command(uri, host, port, allowed_hosts)
    if dry_run:
        return server
    _database(uri).parent.mkdir(parents=True, exist_ok=True)
    if on_start is not None:
        on_start(server)
    server.returncode = serve(server.cmd)
    return server


def _stop_group(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    """TERM the server's whole process group (mlflow server runs uvicorn as a child), then KILL."""
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def serve(cmd: list[str]) -> int:
    """Run the server in its own process group until it exits or we get Ctrl-C / SIGTERM."""
    proc = subprocess.Popen(cmd, start_new_session=True)

    def _on_term(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, _on_term)
    try:
        return proc.wait()
    except KeyboardInterrupt:
        _stop_group(proc)
        return 0
    finally:
        signal.signal(signal.SIGTERM, previous)


__all__ = ["UiServer", "mlflow_ui", "serve", "server_command"]
