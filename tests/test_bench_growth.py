"""bench/bench_growth.py (and bench/growth_report.py): the report's arithmetic on made-up figures, and its structure on a real tiny run (40 ECGs,
every stage in its own process, Ray included). Speed is never asserted."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from bench import bench_growth as bg
from bench import growth_report as gr

MiB = 1 << 20


def _raw(records: int, seconds: float, cores: int, rss_mib: float, anon_mib: float, cpu_s: float = 0.0,
         self_mib: float = 0.0, children_mib: float = 0.0) -> dict:
    return {"records": records, "seconds": seconds, "cores": cores, "cpu_s_rusage": cpu_s,
            "maxrss_self": int(self_mib * MiB), "maxrss_children": int(children_mib * MiB),
            "sampled": {"peak_rss_sampled": int(rss_mib * MiB), "peak_anon": int(anon_mib * MiB),
                        "cpu_s_sampled": cpu_s / 2, "peak_rss_process": "stage process"}}


def _size(n: int, ingest_s: float, floor_s: float, rss_mib: float, anon_mib: float) -> dict:
    stages = {
        "floor": gr.stage_figures(_raw(n, floor_s, 1, 100, 50, cpu_s=floor_s), n, 0, "nothing"),
        "ingest": gr.stage_figures(_raw(n, ingest_s, 2, rss_mib, anon_mib, cpu_s=2 * ingest_s), n, 1000 * n, "cohort"),
    }
    return {"n_ecgs": n, "stages": stages}


def test_stage_figures_divide_by_the_cores_used_and_take_the_largest_peak() -> None:
    f = gr.stage_figures(_raw(1000, 10.0, 2, 300, 200, cpu_s=16.0, self_mib=250, children_mib=420), 1000, 5_000_000, "x")
    assert f["records_per_s"] == pytest.approx(100.0)
    assert f["records_per_s_per_core"] == pytest.approx(50.0)  # 1000 records / 10 s / 2 cores
    assert f["records_per_cpu_s"] == pytest.approx(1000 / 16.0)  # rusage (16) beats the sampled CPU (8)
    assert f["peak_rss_per_process_bytes"] == 420 * MiB  # RUSAGE_CHILDREN (a reaped worker) was the largest
    assert f["peak_anon_per_process_bytes"] == 200 * MiB
    assert f["disk_bytes_per_ecg"] == pytest.approx(5000.0)


def test_floor_fraction_growth_targets_and_projection() -> None:
    small = _size(1000, ingest_s=10.0, floor_s=4.0, rss_mib=400, anon_mib=250)  # ingest 50/s/core, floor 250/s
    big = _size(10000, ingest_s=125.0, floor_s=40.0, rss_mib=600, anon_mib=260)  # ingest 40/s/core, floor 250/s
    assert gr.floor_fraction(small) == pytest.approx(0.2)
    assert gr.floor_fraction(big) == pytest.approx(0.16)
    grow = gr.growth([big, small])  # order does not matter: smallest vs largest
    g = grow["ingest"]
    assert (g["from_n"], g["to_n"]) == (1000, 10000)
    assert g["throughput_per_core"] == pytest.approx(0.8)
    assert g["peak_rss"] == pytest.approx(1.5)
    assert g["peak_anon"] == pytest.approx(1.04)
    assert grow["floor"]["throughput_per_core"] == pytest.approx(1.0)
    rows = {t["target"]: t for t in gr.targets([small, big], grow)}
    assert not rows["ingest / floor, records/s per core, N=1000"]["pass"]
    assert rows["ingest / floor, records per CPU-second, N=1000"]["value"] == pytest.approx(0.2)  # same CPU use
    assert rows["ingest, N=10000 / N=1000: records per CPU-second"]["value"] == pytest.approx(0.8)
    assert rows["ingest, N=10000 / N=1000: records/s per core"]["pass"]  # exactly 0.80 passes
    assert not rows["ingest, N=10000 / N=1000: peak RSS per process"]["pass"]
    assert rows["ingest, N=10000 / N=1000: peak anonymous RSS per process"]["pass"]
    assert not any(t["target"].startswith("floor,") for t in rows.values())  # the floor is a reference only
    assert gr.growth([small]) == {}
    proj = gr.project([small, big], 100_000)
    assert proj["ingest"]["seconds"] == pytest.approx(1250.0)
    assert proj["ingest"]["disk_bytes"] == pytest.approx(1000 * 100_000)
    assert proj["ingest"]["peak_rss_per_process_bytes"] == pytest.approx((600 + 200 / 9000 * 90000) * MiB)
    table = gr.markdown({"sizes": [small, big], "targets": gr.targets([small, big], grow), "growth": grow,
                         "projection": proj, "projection_n": 100_000})
    assert "| 10000 | ingest | 125.0 | 10000 | 80.0 | 2 | 40.0 |" in table and "FAIL" in table and "PASS" in table


def test_synth_config_covers_the_requested_ecgs_with_one_view_per_study() -> None:
    cfg = bg.synth_config(1001)
    assert cfg.patients * cfg.ecgs_per_patient >= 1001 and cfg.views == 1
    assert bg.floor_headers(Path("/nonexistent")) == []


@pytest.mark.ray
def test_tiny_run_reports_every_stage(tmp_path: Path) -> None:
    result = bg.run([40], tmp_path / "work", processes=1, command="test", verbose=False)  # ingest in-process: faster
    (size,) = result["sizes"]
    assert size["n_ecgs"] == 40 and size["views"] == 10  # 4 ECGs and one view per patient
    assert list(size["stages"]) == list(gr.STAGES)
    for name, st in size["stages"].items():
        assert st["seconds"] > 0 and st["records"] > 0 and st["cores"] >= 1, name
        assert st["records_per_s_per_core"] == pytest.approx(st["records"] / st["seconds"] / st["cores"], rel=1e-3), name
        assert st["peak_rss_per_process_bytes"] >= st["peak_anon_per_process_bytes"] > 0, name
        assert st["processes_seen"] >= 1 and st["cpu_s"] > 0, name
    st = size["stages"]
    assert st["ingest"]["records"] == 40 and st["floor"]["records"] == 40 and st["ingest"]["cores"] == 1
    assert st["features"]["records"] == 10 * st["features"]["extra"]["variants"]
    assert st["features"]["processes_seen"] > 2  # Ray's own processes and its actors are in the tree
    assert st["synth"]["disk_bytes"] > 0 and st["ingest"]["disk_bytes"] > 0 and st["floor"]["disk_bytes"] == 0
    assert st["ingest"]["disk_bytes_per_ecg"] == pytest.approx(st["ingest"]["disk_bytes"] / 40)
    assert size["peak_work_disk_bytes"] >= st["ingest"]["disk_bytes"]
    assert size["ingest_vs_floor"] == pytest.approx(st["ingest"]["records_per_s_per_core"]
                                                     / st["floor"]["records_per_s_per_core"])
    assert st["ingest"]["raw"]["cpu_s_pre"] > 0  # the stage process's start-up CPU, kept out of the stage's
    assert not (tmp_path / "work" / "n40" / "raw").exists()  # the raw export went after ingest
    assert (tmp_path / "work" / "n40" / "cohort" / "cohort.json").exists()
    assert size["ingest_vs_floor_cpu"] == pytest.approx(st["ingest"]["records_per_cpu_s"]
                                                         / st["floor"]["records_per_cpu_s"])
    assert result["growth"] == {} and [t["target"] for t in result["targets"]] == [
        "ingest / floor, records/s per core, N=40", "ingest / floor, records per CPU-second, N=40"]
    assert result["settings"]["work_filesystem"] != "?"
    saved = tmp_path / "growth.json"
    saved.write_text(json.dumps(result))  # the report is plain JSON, and re-renders the same
    assert bg.main(["--from-json", str(saved)])["targets"] == result["targets"]
    table = gr.markdown(result)
    assert all(f"| 40 | {name} |" in table for name in gr.STAGES) and "ingest / floor" in table
    assert all(math.isfinite(p["seconds"]) for k, p in result["projection"].items() if k in gr.STAGES)
