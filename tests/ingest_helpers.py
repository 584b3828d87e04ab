"""Reading an ingest's site-side map in tests: quarantine rows and table rows with their original paths."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from stence.data.ingest import read_site_map


def site_map(cohort: Path) -> pd.DataFrame:
    """The site-only map written beside the cohort (file pseudonym -> original path, status, reason)."""
    return read_site_map(Path(f"{cohort}.site-identifiers"))


def quarantine_with_paths(cohort: Path, quarantine: pd.DataFrame | None = None) -> pd.DataFrame:
    """quarantine.parquet with each row's original path (a table row maps to its table's name)."""
    q = quarantine if quarantine is not None else pd.read_parquet(Path(cohort) / "quarantine.parquet")
    m = site_map(cohort)
    m = m[m["status"] == "quarantined"].drop_duplicates("file").set_index("file")["path"]
    return q.assign(path=q["file"].map(m))
