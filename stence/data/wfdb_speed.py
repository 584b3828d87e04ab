"""wfdb's header parsing without its per-field pandas lookups: the same code, the same fields, faster.

wfdb 4.x parses each header line by looking up `SIGNAL_SPECS.loc[field, column]` (a pandas scalar access,
about 30 µs) for every field of every channel: about 12 ms per 12-lead header, as much as reading and
decoding the record's samples, and ingest parses each header twice (its checks, then `rdrecord`).

`install()` re-binds wfdb's two header-line parsers to their own unchanged code run with globals in which the
two spec tables are plain-dict views of wfdb's tables (`.index` and `.loc[row, column]`, the only accesses
those two functions make). Nothing else in wfdb changes; writing headers still uses the pandas tables. When a
wfdb version names other globals in these functions, `install()` leaves wfdb as it is.
"""

from __future__ import annotations

import types
from typing import Any

from wfdb.io import _header

_PATCHED = ("_parse_signal_lines", "_parse_record_line")
_TABLES = {"_parse_signal_lines": "SIGNAL_SPECS", "_parse_record_line": "RECORD_SPECS"}


class SpecView:
    """Read-only dict view of a wfdb spec DataFrame: `.index` (row labels in order) and `.loc[row, col]`."""

    def __init__(self, table: Any):
        self.index = list(table.index)
        self.loc = {(r, c): table.at[r, c] for r in table.index for c in table.columns}


def _fast_copy(fn: types.FunctionType, table: str) -> types.FunctionType | None:
    """`fn`'s code with its spec table replaced by a SpecView, or None if `fn` does not look as expected."""
    if table not in fn.__code__.co_names or getattr(fn, "__wrapped_spec__", False):
        return None
    glb = dict(fn.__globals__)
    glb[table] = SpecView(glb[table])
    fast = types.FunctionType(fn.__code__, glb, fn.__name__, fn.__defaults__, fn.__closure__)
    fast.__doc__ = fn.__doc__
    fast.__wrapped_spec__ = True  # type: ignore[attr-defined]
    fast.__original__ = fn  # type: ignore[attr-defined]
    return fast


def install() -> bool:
    """Re-bind wfdb's header-line parsers (idempotent); True when both are the fast copies."""
    for name in _PATCHED:
        fn = getattr(_header, name, None)
        if not isinstance(fn, types.FunctionType):
            return False
        fast = _fast_copy(fn, _TABLES[name])
        if fast is not None:
            setattr(_header, name, fast)
    return installed()


def installed() -> bool:
    return all(getattr(getattr(_header, n, None), "__wrapped_spec__", False) for n in _PATCHED)


def original(name: str) -> types.FunctionType:
    """wfdb's own parser `name` (for tests comparing the two)."""
    fn = getattr(_header, name)
    return getattr(fn, "__original__", fn)
