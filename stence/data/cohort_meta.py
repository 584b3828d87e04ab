"""A cohort's summary file, `cohort.json` (fingerprint, split sizes, the settings it was ingested with), read
without the tables' dependencies (pandas, pyarrow): tracking reads it to name the cohort a run used, and
`Cohort` (stence/data/cohort_io.py) reads it through here."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

COHORT_META_FILE = "cohort.json"  # written last by ingest: its presence marks a complete cohort


def require_cohort(root: str | Path) -> Path:
    """`root` as a Path; FileNotFoundError (saying how to make one) when it is not a complete cohort."""
    root = Path(root)
    if not (root / COHORT_META_FILE).exists():
        raise FileNotFoundError(
            f"{root} is not a complete cohort (no {COHORT_META_FILE}); run `stence ingest RAW --out {root}`"
        )
    return root


def read_cohort_meta(root: str | Path) -> dict[str, Any]:
    """The parsed `cohort.json` of the complete cohort at `root` (FileNotFoundError when it is not one)."""
    return json.loads((require_cohort(root) / COHORT_META_FILE).read_text())
