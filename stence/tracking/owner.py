"""Which process drives a run, and whether it is still alive: the rule `stence runs repair` uses to tell an
orphaned RUNNING run (its driver was SIGKILLed, its machine lost) from one that is merely quiet.

A run's driver is recorded at creation (and again when a resumed sweep reopens it) in the tag
`stence.driver` as "host|pid|boot id|start ticks". The boot id and the process start time (in clock ticks
since boot, from /proc) make the pair immune to pid reuse: a pid that now belongs to another process does
not count as the driver. Only a driver on this host can be checked; elsewhere the answer is "unknown".
"""

from __future__ import annotations

import os
import socket
from pathlib import Path


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _start_ticks(pid: int) -> str | None:
    """Start time of `pid` in clock ticks since boot; None if no such (live) process; "" without /proc."""
    if not Path("/proc/self/stat").exists():
        return ""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return None
    except OSError:
        return ""
    fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) ": state is field 3, starttime 22
    if fields[0] in ("Z", "X"):  # a zombie has exited already
        return None
    return fields[19]


def driver_identity(pid: int | None = None) -> str:
    """"host|pid|boot id|start ticks" of this process (or of `pid` on this host)."""
    pid = pid or os.getpid()
    return f"{socket.gethostname()}|{pid}|{_boot_id()}|{_start_ticks(pid) or ''}"


def driver_alive(identity: str | None) -> bool | None:
    """True if the recorded driver still runs, False if it provably does not, None if this host cannot tell
    (another host, or no driver recorded)."""
    if not identity:
        return None
    parts = identity.split("|")
    if len(parts) != 4 or parts[0] != socket.gethostname():
        return None
    _, pid_s, boot, start = parts
    try:
        pid = int(pid_s)
    except ValueError:
        return None
    if boot and _boot_id() and boot != _boot_id():
        return False  # the machine rebooted since
    now = _start_ticks(pid)
    if now is None:
        return False
    if now == "":  # no /proc (not Linux): a signal-0 probe is the best available
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    return not start or now == start


__all__ = ["driver_alive", "driver_identity"]
