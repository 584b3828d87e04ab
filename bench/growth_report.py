"""The growth benchmark's figures, targets, projection and table (bench/bench_growth.py): pure functions of its
per-stage measurements, so that tests check their arithmetic."""

from __future__ import annotations

STAGES = ("synth", "floor", "ingest", "features", "pretrain")
MEASURED = ("synth", "ingest", "features", "pretrain")  # stages with growth targets (the floor is a reference)

FLOOR_TARGET = 0.50  # ingest records/s per core >= 50 % of read+decode alone
THROUGHPUT_TARGET = 0.80  # records/s per core at the largest size >= 80 % of the smallest (a speed-up passes)
MEMORY_TARGET = 1.20  # peak RSS per process at the largest size <= 1.2 x the smallest
MiB = 1 << 20


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or not b else a / b


def stage_figures(raw: dict, n_ecgs: int, disk_bytes: int, disk_what: str) -> dict:
    """A stage's raw figures -> the reported ones (rates, per core, per process peak, disk per ECG)."""
    s = raw.get("sampled", {})
    seconds, records, cores = float(raw["seconds"]), int(raw["records"]), int(raw["cores"])
    rate = records / seconds if seconds > 0 else None
    # both are lower bounds: rusage misses children not reaped (Ray's), sampling misses a process's last 0.25 s
    cpu_s = max(float(raw.get("cpu_s_rusage", 0.0)), float(s.get("cpu_s_sampled", 0.0)) - float(raw.get("cpu_s_pre", 0.0)))
    peak = max(int(s.get("peak_rss_sampled", 0)), int(raw.get("maxrss_self", 0)), int(raw.get("maxrss_children", 0)))
    return {
        "records": records, "record_unit": raw.get("record_unit", "ECG record"),
        "seconds": round(seconds, 6), "process_wall_s": round(float(raw.get("process_wall_s", seconds)), 3),
        "records_per_s": rate, "cores": cores, "cores_note": raw.get("cores_note", ""),
        "records_per_s_per_core": None if rate is None else rate / cores,
        "cpu_s": round(cpu_s, 3), "records_per_cpu_s": _ratio(records, cpu_s),
        "peak_rss_per_process_bytes": peak, "peak_rss_process": s.get("peak_rss_process", "?"),
        "peak_anon_per_process_bytes": int(s.get("peak_anon", 0)),
        "peak_file_backed_per_process_bytes": int(s.get("peak_file", 0)),
        "peak_tree_rss_bytes": int(s.get("peak_tree_rss", 0)), "processes_seen": int(s.get("processes_seen", 0)),
        "maxrss_self_bytes": int(raw.get("maxrss_self", 0)), "maxrss_children_bytes": int(raw.get("maxrss_children", 0)),
        "top_processes": s.get("top_processes", []),
        "disk_bytes": int(disk_bytes), "disk_what": disk_what,
        "disk_bytes_per_ecg": disk_bytes / n_ecgs if n_ecgs else None,
        "loadavg_1min_start_end": raw.get("loadavg_1min"),
        "extra": raw.get("extra", {}),
        "raw": raw,  # as measured (the figures above are made from it)
    }


def floor_fraction(size: dict, key: str = "records_per_s_per_core") -> float | None:
    """Ingest's ECG records/s per core (or per CPU-second, `key`) over read+decode alone (one process), in the
    same run."""
    st = size["stages"]
    if "ingest" not in st or "floor" not in st:
        return None
    return _ratio(st["ingest"][key], st["floor"][key])


def growth(sizes: list[dict]) -> dict[str, dict]:
    """Per stage, largest size over smallest: throughput per core, peak RSS per process (and its anon part)."""
    if len(sizes) < 2:
        return {}
    lo, hi = min(sizes, key=lambda s: s["n_ecgs"]), max(sizes, key=lambda s: s["n_ecgs"])
    out = {}
    for name in STAGES:
        a, b = lo["stages"].get(name), hi["stages"].get(name)
        if a and b:
            out[name] = {
                "from_n": lo["n_ecgs"], "to_n": hi["n_ecgs"],
                "throughput_per_core": _ratio(b["records_per_s_per_core"], a["records_per_s_per_core"]),
                "throughput_per_cpu_s": _ratio(b["records_per_cpu_s"], a["records_per_cpu_s"]),
                "peak_rss": _ratio(b["peak_rss_per_process_bytes"], a["peak_rss_per_process_bytes"]),
                "peak_anon": _ratio(b["peak_anon_per_process_bytes"], a["peak_anon_per_process_bytes"]),
            }
    return out


def targets(sizes: list[dict], grow: dict[str, dict]) -> list[dict]:
    """Each target with its measured value, its goal and PASS / FAIL."""
    rows = []
    for s in sizes:
        f, fc = floor_fraction(s), floor_fraction(s, "records_per_cpu_s")
        if f is not None:
            rows.append({"target": f"ingest / floor, records/s per core, N={s['n_ecgs']}", "value": f,
                         "goal": f">= {FLOOR_TARGET:.2f}", "pass": f >= FLOOR_TARGET})
        if fc is not None:
            rows.append({"target": f"ingest / floor, records per CPU-second, N={s['n_ecgs']}", "value": fc,
                         "goal": f">= {FLOOR_TARGET:.2f}", "pass": fc >= FLOOR_TARGET})
    for name in MEASURED:
        g = grow.get(name)
        if not g:
            continue
        span = f"{name}, N={g['to_n']} / N={g['from_n']}"
        if g["throughput_per_core"] is not None:
            rows.append({"target": f"{span}: records/s per core", "value": g["throughput_per_core"],
                         "goal": f">= {THROUGHPUT_TARGET:.2f}", "pass": g["throughput_per_core"] >= THROUGHPUT_TARGET})
        if g["throughput_per_cpu_s"] is not None:
            rows.append({"target": f"{span}: records per CPU-second", "value": g["throughput_per_cpu_s"],
                         "goal": f">= {THROUGHPUT_TARGET:.2f}", "pass": g["throughput_per_cpu_s"] >= THROUGHPUT_TARGET})
        if g["peak_rss"] is not None:
            rows.append({"target": f"{span}: peak RSS per process", "value": g["peak_rss"],
                         "goal": f"<= {MEMORY_TARGET:.2f}", "pass": g["peak_rss"] <= MEMORY_TARGET})
        if g["peak_anon"] is not None:
            rows.append({"target": f"{span}: peak anonymous RSS per process", "value": g["peak_anon"],
                         "goal": f"<= {MEMORY_TARGET:.2f}", "pass": g["peak_anon"] <= MEMORY_TARGET})
    return rows


def project(sizes: list[dict], n: int = 100_000) -> dict[str, dict]:
    """Per stage at `n` ECGs: time at the largest size's per-record rate, disk at its bytes per ECG, and peak
    RSS per process on the line through the two extreme sizes (the largest one's value with one size)."""
    if not sizes:
        return {}
    lo, hi = min(sizes, key=lambda s: s["n_ecgs"]), max(sizes, key=lambda s: s["n_ecgs"])
    scale = n / hi["n_ecgs"]
    out: dict[str, dict] = {}
    for name, b in hi["stages"].items():
        a = lo["stages"].get(name, b)

        def line(key: str, a: dict = a, b: dict = b) -> float:  # this stage's pair
            if hi["n_ecgs"] == lo["n_ecgs"]:
                return float(b[key])
            slope = (b[key] - a[key]) / (hi["n_ecgs"] - lo["n_ecgs"])
            return float(b[key] + slope * (n - hi["n_ecgs"]))

        out[name] = {"seconds": b["seconds"] * scale, "disk_bytes": b["disk_bytes"] * scale,
                     "peak_rss_per_process_bytes": line("peak_rss_per_process_bytes"),
                     "peak_anon_per_process_bytes": line("peak_anon_per_process_bytes")}
    if "peak_work_disk_bytes" in hi:
        out["ingest_peak_work_disk_bytes"] = {"bytes": hi["peak_work_disk_bytes"] * scale}
    return out


def _fmt(v: float | None, spec: str = ".1f") -> str:
    return "n/a" if v is None else format(v, spec)


def _load(st: dict) -> str:
    load = st.get("loadavg_1min_start_end")
    return "n/a" if not load else f"{load[0]:.1f}-{load[1]:.1f}"


def markdown(result: dict) -> str:
    lines = ["| N ECGs | stage | wall s | records | rec/s | cores | rec/s/core | rec/CPU-s | peak RSS/proc MiB "
             "| of it anon MiB | disk B/ECG | load |", "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for s in result["sizes"]:
        for name, st in s["stages"].items():
            lines.append(
                f"| {s['n_ecgs']} | {name} | {st['seconds']:.1f} | {st['records']} | {_fmt(st['records_per_s'])} "
                f"| {st['cores']} | {_fmt(st['records_per_s_per_core'])} | {_fmt(st['records_per_cpu_s'])} "
                f"| {st['peak_rss_per_process_bytes'] / MiB:.0f} | {st['peak_anon_per_process_bytes'] / MiB:.0f} "
                f"| {_fmt(st['disk_bytes_per_ecg'], '.0f')} | {_load(st)} |")
    lines += ["", "| target | measured | goal | |", "|---|---:|---|---|"]
    for t in result["targets"]:
        lines.append(f"| {t['target']} | {t['value']:.2f} | {t['goal']} | {'PASS' if t['pass'] else 'FAIL'} |")
    if not result["growth"]:
        lines.append("| growth ratios | n/a | two sizes or more | |")
    lines += ["", "rec/s/core: wall-clock records/s divided by the cores the stage is given (ingest: its decode "
              "processes; features: Ray actors; others 1). rec/CPU-s: records per CPU-second the stage's process tree "
              "used (robust to other jobs on a shared machine). load: 1-min load average at the stage's start-end "
              f"(this machine has {result.get('machine', {}).get('cores', '?')} cores)."]
    proj = result.get("projection", {})
    if proj:
        n = result["projection_n"]
        lines += ["", f"Projected to N={n} (time and disk linear in N from the largest size; peak RSS on the line "
                      "through the smallest and largest sizes):", "",
                  "| stage | time min | disk GiB | peak RSS/proc MiB | of it anon MiB |", "|---|---:|---:|---:|---:|"]
        for name, p in proj.items():
            if name in STAGES:
                lines.append(f"| {name} | {p['seconds'] / 60:.0f} | {p['disk_bytes'] / 2**30:.1f} "
                             f"| {p['peak_rss_per_process_bytes'] / MiB:.0f} | {p['peak_anon_per_process_bytes'] / MiB:.0f} |")
        if "ingest_peak_work_disk_bytes" in proj:
            lines.append(f"| ingest: peak disk of raw + staging + cohort | | "
                         f"{proj['ingest_peak_work_disk_bytes']['bytes'] / 2**30:.1f} | | |")
    return "\n".join(lines)
