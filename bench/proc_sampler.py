"""Measuring a process tree from outside, for the growth benchmark (bench/bench_growth.py): peak resident and
anonymous memory of every process of the tree (read from /proc, so pool workers count too), their CPU time,
and the disk a folder takes meanwhile."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any

MiB = 1 << 20


def tree_bytes(path: Path) -> int:
    """Bytes allocated on disk under `path` (st_blocks; 0 if it does not exist)."""
    total = 0
    if path.is_file():
        return path.stat().st_blocks * 512
    for root, _dirs, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(root, f)).st_blocks * 512
            except FileNotFoundError:  # removed while walking (staging files)
                pass
    return total


_STATUS_KEYS = {"VmHWM": "hwm", "VmRSS": "rss", "RssAnon": "anon", "RssFile": "file", "RssShmem": "shmem"}
_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _read_status(pid: int) -> dict[str, Any] | None:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    out: dict[str, Any] = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key == "Name":
            out["name"] = value.strip()
        elif key in _STATUS_KEYS:
            out[_STATUS_KEYS[key]] = int(value.split()[0]) * 1024
    return out


def _label(pid: int, name: str) -> str:
    """A short name for a process: the stage process, a spawned pool worker, a Ray process, or its command."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return name
    cmd = " ".join(a.decode("utf-8", "replace") for a in argv if a)
    if "bench_growth --stage" in cmd:
        return "stage process"
    if "multiprocessing" in cmd:
        return "spawned worker (multiprocessing)"
    if cmd.startswith("ray::"):
        return cmd.split()[0]
    words = cmd.split()
    if not words:
        return name
    head = Path(words[0]).name
    mod = next((w for w in words[1:] if w.endswith(".py") or "/ray/" in w), "")
    return f"{head} {Path(mod).name}".strip() if mod else head


def _ppid_and_cpu(pid: int) -> tuple[int, float] | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    f = stat[stat.rindex(")") + 2:].split()  # fields from 3 (state) on
    return int(f[1]), (int(f[11]) + int(f[12])) / _TICK  # ppid, utime + stime


class TreeSampler(threading.Thread):
    """Samples a process and all its descendants from /proc every `interval` s: per process the high-water
    mark of its resident set (VmHWM) and the largest anonymous / file-backed parts seen, the tree's summed
    RSS, and CPU seconds; optionally the bytes under `disk` every `disk_every` s."""

    def __init__(self, root_pid: int, interval: float = 0.25, disk: Path | None = None, disk_every: float = 5.0):
        super().__init__(daemon=True)
        self.root, self.interval, self.disk, self.disk_every = root_pid, interval, disk, disk_every
        self.procs: dict[int, dict[str, Any]] = {}
        self.tree_rss = self.tree_anon = self.disk_peak = 0
        self._halt = threading.Event()

    def _tree(self) -> list[tuple[int, float]]:
        kids: dict[int, list[int]] = {}
        cpu: dict[int, float] = {}
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                got = _ppid_and_cpu(int(entry))
                if got:
                    kids.setdefault(got[0], []).append(int(entry))
                    cpu[int(entry)] = got[1]
        out, todo = [], [self.root]
        while todo:
            pid = todo.pop()
            if pid in cpu:
                out.append((pid, cpu[pid]))
            todo += kids.get(pid, [])
        return out

    def sample(self) -> None:
        rss = anon = 0
        for pid, cpu in self._tree():
            st = _read_status(pid)
            if not st or "rss" not in st:  # gone, or a zombie
                continue
            if pid not in self.procs:
                self.procs[pid] = {"name": _label(pid, st.get("name", "?")), "hwm": 0, "anon": 0, "file": 0, "cpu_s": 0.0}
            p = self.procs[pid]
            p["hwm"] = max(p["hwm"], st.get("hwm", 0), st["rss"])
            p["anon"] = max(p["anon"], st.get("anon", 0))
            p["file"] = max(p["file"], st.get("file", 0))
            p["cpu_s"] = max(p["cpu_s"], cpu)
            rss, anon = rss + st["rss"], anon + st.get("anon", 0)
        self.tree_rss, self.tree_anon = max(self.tree_rss, rss), max(self.tree_anon, anon)

    def run(self) -> None:
        last_disk = 0.0
        while not self._halt.is_set():
            self.sample()
            if self.disk is not None and time.monotonic() - last_disk >= self.disk_every:
                t0 = time.monotonic()
                self.disk_peak = max(self.disk_peak, tree_bytes(self.disk))
                last_disk = time.monotonic()
                # a walk of a 10^5-file tree takes seconds: keep it under ~5 % of one core
                self.disk_every = max(self.disk_every, 20 * (last_disk - t0))
            self._halt.wait(self.interval)

    def stop(self) -> None:
        self._halt.set()
        self.join()

    def stats(self) -> dict[str, Any]:
        procs = sorted(self.procs.values(), key=lambda p: -p["hwm"])
        top = procs[0] if procs else {"name": "?", "hwm": 0, "anon": 0, "file": 0}
        return {
            "peak_rss_sampled": top["hwm"], "peak_rss_process": top["name"],
            "peak_anon": max((p["anon"] for p in procs), default=0),
            "peak_file": max((p["file"] for p in procs), default=0),
            "peak_tree_rss": self.tree_rss, "peak_tree_anon": self.tree_anon, "processes_seen": len(procs),
            "cpu_s_sampled": sum(p["cpu_s"] for p in procs),
            "top_processes": [{"name": p["name"], "peak_rss_mib": round(p["hwm"] / MiB, 1),
                               "peak_anon_mib": round(p["anon"] / MiB, 1)} for p in procs[:4]],
        }
