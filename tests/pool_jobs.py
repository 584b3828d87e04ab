"""Job functions for the decode-pool tests (importable by spawned worker processes)."""

from __future__ import annotations

import os
import signal


def kill_on_three(x: int) -> dict:
    """Returns {"x": x}; the worker that gets 3 dies as the OOM killer would end it (SIGKILL)."""
    if x == 3:
        os.kill(os.getpid(), signal.SIGKILL)
    return {"x": x}
