"""Ending orphaned MLflow runs: runs left RUNNING because the process that drove them is gone (a driver
SIGKILLed, a machine lost), so nothing will ever end them.

The rule (never end a run whose driver is alive):
  * a RUNNING run whose recorded driver (`stence.driver`, see owner.py) is on this host and no longer
    runs is orphaned;
  * a run whose driver is alive is never touched;
  * a run whose driver cannot be checked from here (another host, or a run from before drivers were
    recorded) is orphaned only when the caller says how long it must have been idle (`older_than_min`):
    no start, heartbeat (`stence.heartbeat`, refreshed with every epoch's metrics) or sweep activity for
    that many minutes.
Before an orphan is ended, its spool is replayed: the buffered metrics and the status its driver meant to
set come first. What is still RUNNING then gets the state its caller chooses (`status_for`); the reason
is kept in the tag `stence.repaired`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stence.tracking.client import tracking_client
from stence.tracking.owner import driver_alive
from stence.tracking.replay import replay
from stence.tracking.runs import run_status, search_runs_by
from stence.tracking.spool import pending_records
from stence.tracking.tags import DRIVER_TAG, HEARTBEAT_TAG, REPAIRED_TAG, SPOOL_TAG


@dataclass(frozen=True)
class Verdict:
    run: Any  # mlflow.entities.Run
    orphan: bool
    reason: str


@dataclass(frozen=True)
class Repair:
    run_id: str
    name: str
    status: str  # the run's status after the repair (or the one it would get, in a dry run)
    reason: str


def last_activity_s(run: Any) -> float:
    """Unix seconds of the run's latest sign of life: its start or its latest heartbeat."""
    start = (run.info.start_time or 0) / 1000
    try:
        beat = float(run.data.tags.get(HEARTBEAT_TAG, 0))
    except ValueError:
        beat = 0.0
    return max(start, beat)


def judge(run: Any, older_than_min: float | None, now_s: float | None = None) -> Verdict:
    """Whether a RUNNING run is orphaned, and why (the module's rule)."""
    driver = run.data.tags.get(DRIVER_TAG, "")
    alive = driver_alive(driver)
    idle_min = ((now_s or time.time()) - last_activity_s(run)) / 60
    if alive:
        return Verdict(run, False, f"its driver ({driver}) is alive")
    if older_than_min is not None and idle_min < older_than_min:
        return Verdict(run, False, f"active {idle_min:.0f} min ago (< --older-than {older_than_min:g})")
    if alive is False:
        return Verdict(run, True, f"its driver ({driver}) is gone")
    host = driver.split("|")[0] if driver else "unknown"
    if older_than_min is not None:
        return Verdict(run, True, f"idle for {idle_min:.0f} min; its driver (host {host}) cannot be checked here")
    return Verdict(run, False, f"its driver (host {host}) cannot be checked from here: pass --older-than MIN")


def find_orphans(uri: str, experiment: str, tags: dict[str, Any] | None = None,
                 older_than_min: float | None = None) -> list[Verdict]:
    """A verdict for every RUNNING run of `experiment` carrying `tags`."""
    now = time.time()
    return [judge(run, older_than_min, now) for run in search_runs_by(uri, experiment, tags or {}, status="RUNNING")]


def replay_spools(runs: list[Any]) -> dict[str, str]:
    """Replay the spool file of each run (once per file); returns {spool: outcome} for the ones with work."""
    out = {}
    for spool in dict.fromkeys(r.data.tags.get(SPOOL_TAG, "") for r in runs):
        if spool and Path(spool).exists() and pending_records(Path(spool)):
            stats = replay(spool)
            out[spool] = (f"replayed {stats.applied}, skipped {stats.skipped_steps} steps already logged"
                          + (f", {stats.pending} still pending ({stats.error})" if stats.pending else ""))
    return out


def end_orphans(uri: str, orphans: list[Verdict], status_for: Callable[[Any], str],
                dry_run: bool = False) -> list[Repair]:
    """Replay the orphans' spools, then end those still RUNNING with `status_for(run)`."""
    if not dry_run:
        replay_spools([v.run for v in orphans])
    client = tracking_client(uri)
    done = []
    for v in orphans:
        run_id, name = v.run.info.run_id, v.run.info.run_name
        status = v.run.info.status if dry_run else run_status(uri, run_id)
        if status != "RUNNING":
            done.append(Repair(run_id, name, status, "ended by its buffered (spooled) status"))
            continue
        new = status_for(v.run)
        if not dry_run:
            client.set_tag(run_id, REPAIRED_TAG, f"{new}: {v.reason}"[:5000])
            client.set_terminated(run_id, new)
        done.append(Repair(run_id, name, new, v.reason))
    return done


__all__ = ["Repair", "Verdict", "end_orphans", "find_orphans", "judge", "last_activity_s",
           "replay_spools"]
