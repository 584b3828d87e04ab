"""`stence ingest`: a raw hospital export -> a pseudonymised cohort. The steps (decode, quarantine, pair,
de-identify, write, rename into place) are stence.data.ingest's; this module names the pipeline, picks the
decode engine (a local process pool, or Ray Data over a Ray cluster) and the errors it reports as one
line each."""

from __future__ import annotations

import os
from pathlib import Path

from stence.config import Config
from stence.data.export_tables import ExportTableError
from stence.data.ingest import DiskFullError, IdentifierLeakError, IngestReport, NothingUsableError, ingest
from stence.data.pseudonym import SaltError
from stence.data.ray_decode import SharedStorageError
from stence.outputs import OutputRefused
from stence.train.driver import ensure_ray, own_ray_address, shutdown_ray

# what ingest refuses with a one-line message (nothing outside its staging and site folders written)
INGEST_ERRORS: tuple[type[BaseException], ...] = (
    OutputRefused, ExportTableError, NothingUsableError, IdentifierLeakError, DiskFullError, SaltError,
    FileNotFoundError, SharedStorageError,
)


def cluster_address() -> str | None:
    """$RAY_ADDRESS when it names a cluster to use; None when unset, or when it is only the address that
    this process's own local Ray instance exported (stence.train.driver.ensure_ray does, for Ray's State API)."""
    address = os.environ.get("RAY_ADDRESS") or None
    if address is None:
        return None
    return None if address == own_ray_address() else address


def decode_engine(ray: bool = False, processes: int | None = None) -> str:
    """"ray" when asked (`--ray`), or when RAY_ADDRESS names a cluster and no local process count was
    given (`--processes N` is a request for the local pool); else "local", the default on one machine."""
    if ray:
        return "ray"
    return "ray" if processes is None and cluster_address() else "local"


def ingest_cohort(cfg: Config, raw: str | Path, out: str | Path, processes: int | None = None,
                  overwrite: bool = False, ray: bool = False) -> IngestReport:
    """Build the cohort `out` from the raw export `raw` (`processes` decode processes, default all cores;
    `overwrite` replaces an earlier cohort there). With `ray`, or RAY_ADDRESS set (see decode_engine), the
    decoding runs with Ray Data on the cluster's nodes, connected with ensure_ray (RAY_ADDRESS, else a
    local Ray instance); the export and `out` must then be on storage every node mounts at the same path
    (object storage is not supported yet). Raises one of INGEST_ERRORS."""
    if "://" in str(out) or "://" in str(raw):
        raise OutputRefused(f"{out if '://' in str(out) else raw}: object storage is not supported yet; use a "
                            "path every node mounts (NFS, a cluster file system)")
    engine = decode_engine(ray, processes)
    if engine == "local":
        return ingest(raw, out, cfg, processes=processes, overwrite=overwrite, engine="local")
    import ray as ray_mod  # ~0.5 s to import: only when decoding on Ray

    started = not ray_mod.is_initialized()
    ensure_ray()
    try:
        return ingest(raw, out, cfg, processes=processes, overwrite=overwrite, engine="ray")
    finally:
        if started:
            shutdown_ray()


__all__ = ["INGEST_ERRORS", "cluster_address", "decode_engine", "ingest_cohort"]
