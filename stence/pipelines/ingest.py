"""`stence ingest`: a raw hospital export -> a pseudonymised cohort. The steps (decode, quarantine, pair,
de-identify, write, rename into place) are stence.data.ingest's; this module names the pipeline and the
errors it reports as one line each."""

from __future__ import annotations

from pathlib import Path

from stence.config import Config
from stence.data.export_tables import ExportTableError
from stence.data.ingest import DiskFullError, IdentifierLeakError, IngestReport, NothingUsableError, ingest
from stence.data.pseudonym import SaltError
from stence.outputs import OutputRefused

# what ingest refuses with a one-line message (nothing outside its staging and site folders written)
INGEST_ERRORS: tuple[type[BaseException], ...] = (
    OutputRefused, ExportTableError, NothingUsableError, IdentifierLeakError, DiskFullError, SaltError,
    FileNotFoundError,
)


def ingest_cohort(cfg: Config, raw: str | Path, out: str | Path, processes: int | None = None,
                  overwrite: bool = False) -> IngestReport:
    """Build the cohort `out` from the raw export `raw` (`processes` decode processes, default all cores;
    `overwrite` replaces an earlier cohort there). Raises one of INGEST_ERRORS."""
    return ingest(raw, out, cfg, processes=processes, overwrite=overwrite)


__all__ = ["INGEST_ERRORS", "ingest_cohort"]
