"""Growth curves: synth, ingest, feature extraction and one pretraining epoch at growing cohort sizes, measured.

For each size N (ECG records, WFDB, the synthetic generator of stence/data/synth.py) the stages run one after
another, each in a FRESH Python process (so a peak-memory figure belongs to that stage alone):

  synth     write the raw export (N ECGs; 4 ECGs per patient, ONE angiography view of 2 frames per study:
            the fewest views pairing allows, since DICOM XA synthesis is the expensive part)  - 1 process
  floor     the physical limit of ingest: read + decode every WFDB record with `wfdb_io.read_ecg` (the reader
            ingest calls), nothing else (no validation, resampling, baseline fit or writing)  - 1 process
  ingest    `stence.data.ingest.ingest` with `--processes` decode workers                   - N_proc cores
  features  `stence.train.features.extract_features` (Ray Data, `feature.actors` actors)      - actors cores
  pretrain  `run_pretrain`, configs/demo.yaml, ONE epoch, train.workers=0 (in-process local mode; the loop
            sets torch to train.cpus_per_worker = 1 thread); tracking off                     - 1 core

Every stage process (and the processes it starts) runs with OMP/MKL/OpenBLAS threads pinned to 1, so a
process is a core. Per stage: wall time, records/s, records/s per core (divided by the cores named above;
the CPU seconds actually used are reported too), peak resident memory per process, and disk bytes per ECG
record of what the stage wrote. Peak memory per process is the largest VmHWM (kernel high-water mark of the
resident set) over every process of the stage's tree, sampled from /proc, together with the stage process's
own `getrusage` figures (RUSAGE_SELF and RUSAGE_CHILDREN, which covers reaped pool workers). The anonymous
part (RssAnon: heap, not pages of memory-mapped files, which the kernel can drop) is reported beside it.

The raw export is deleted after ingest unless --keep; the whole work folder is deleted at the end unless
--work is given. The 100 k point is meant to run separately (it is not part of `make bench`).

Usage: python -m bench.bench_growth [--sizes 1000 10000] [--work DIR] [--processes 2] [--keep]
                                    [--floor-max 20000] [--out bench/results/growth.json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.growth_report import STAGES, floor_fraction, growth, markdown, project, stage_figures, targets
from bench.proc_sampler import TreeSampler, tree_bytes

REPO = Path(__file__).resolve().parents[1]
DEMO_CONFIG = REPO / "configs" / "demo.yaml"

ECGS_PER_PATIENT = 4  # ECGs per patient: all pair with the patient's study (within +/- 20 days)
VIEWS = 1  # one DICOM XA view per study: the fewest pairing allows
FRAMES = 2  # frames per view (ingest keeps data.key_frames = 1)


PIN_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
RAY_START_RETRIES = 3  # feature extraction: attempts again when Ray's own start-up times out (loaded machine)
MARK = ".bench_growth"  # a size folder this benchmark made (and may remove)


# ------------------------------------------------------------------------------------------------------
# configuration of the stages


def synth_config(n_ecgs: int, ecgs_per_patient: int = ECGS_PER_PATIENT):
    """The generator's defaults (500 Hz, 10 s, 12-lead WFDB), sized to >= n_ecgs ECGs (a whole patient each)."""
    from stence.data.synth import SynthConfig

    patients = max(1, math.ceil(n_ecgs / ecgs_per_patient))
    return SynthConfig(patients=patients, ecgs_per_patient=ecgs_per_patient, views=VIEWS, frames=FRAMES, seed=0)


def bench_config(size_dir: Path):
    """configs/demo.yaml for a one-epoch local-mode pretraining on this size's cohort, tracking off."""
    from stence.config import load_config

    return load_config(DEMO_CONFIG, [
        f"data.cohort={size_dir / 'cohort'}", f"train.storage_path={size_dir / 'storage'}", "train.name=growth",
        "train.workers=0", "optim.epochs=1", "tracking.enabled=false",
    ])


# ------------------------------------------------------------------------------------------------------
# the stages (each runs inside its own process: `python -m bench.bench_growth --stage NAME ...`)


def _pin_threads() -> None:
    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:
        pass
    try:
        from threadpoolctl import threadpool_limits

        threadpool_limits(1)
    except ImportError:
        pass


def stage_synth(size_dir: Path, p: dict) -> dict:
    from stence.data.synth import write_cohort

    s = write_cohort(size_dir / "raw", synth_config(p["n"], p.get("ecgs_per_patient", ECGS_PER_PATIENT)))
    return {"records": s.ecgs, "cores": 1, "cores_note": "one process",
            "extra": {"patients": s.patients, "views": s.views}}


def floor_headers(raw: Path, limit: int = 0) -> list[Path]:
    """The WFDB headers of the export, evenly strided down to `limit` (0 = all)."""
    heads = sorted((raw / "ecg").rglob("*.hea"))
    if limit and len(heads) > limit:
        step = len(heads) / limit
        heads = [heads[int(i * step)] for i in range(limit)]
    return heads


def stage_floor(size_dir: Path, p: dict) -> dict:
    from stence.data.limits import Limits
    from stence.data.wfdb_io import read_ecg

    _pin_threads()
    cfg = bench_config(size_dir)
    heads = floor_headers(size_dir / "raw", p.get("floor_max", 0))
    limits, leads = Limits.from_config(cfg.ingest), cfg.data.leads
    t0 = time.perf_counter()
    samples = 0
    for h in heads:
        samples += read_ecg(h, leads, limits).signal.shape[1]
    return {"records": len(heads), "cores": 1, "cores_note": "one process, one thread",
            "seconds_timed": time.perf_counter() - t0, "extra": {"samples_decoded": samples}}


def stage_ingest(size_dir: Path, p: dict) -> dict:
    from stence.data.ingest import ingest

    os.environ.setdefault("STENCE_SALT", "bench-secret")
    cfg = bench_config(size_dir)
    r = ingest(size_dir / "raw", size_dir / "cohort", cfg, processes=p["processes"])
    return {"records": r.n_ecgs, "cores": p["processes"],
            "cores_note": f"{p['processes']} decode worker processes (the parent's serial steps run between)",
            "extra": {"views": r.n_views, "pairs": r.n_pairs, "patients": r.n_patients,
                      "quarantined": sum(r.quarantined.values()), "files": r.n_files}}


def stage_features(size_dir: Path, p: dict) -> dict:
    from stence.train.driver import shutdown_ray
    from stence.train.features import extract_features

    cfg = bench_config(size_dir)
    retries = 0
    while True:  # a local Ray gives its raylet 30 s to register: on a loaded machine (and at nice 19) it may not
        t0 = time.perf_counter()
        try:
            store = extract_features(cfg, size_dir / "cohort", progress=False)
            break
        except Exception as e:
            if "timed out during startup" not in str(e) or retries >= RAY_START_RETRIES:
                raise
            retries += 1
            print(f"bench_growth: Ray did not start ({e}); retry {retries}", flush=True)
        finally:
            shutdown_ray()
    n_views, n_var = store.meta["shape"][:2]
    return {"records": n_views * n_var, "record_unit": "(view, variant)", "cores": cfg.feature.actors,
            "cores_note": f"{cfg.feature.actors} Ray Data actors of 1 CPU (plus the driver and Ray's own processes)",
            "seconds_timed": time.perf_counter() - t0,  # the attempt that started Ray (with its start-up)
            "extra": {"views": n_views, "variants": n_var, "ray_start_retries": retries}}


def stage_pretrain(size_dir: Path, p: dict) -> dict:
    """One epoch of `run_pretrain`; the loop's validation pieces (retrieval metrics on the whole validation set,
    kNN probe, embedding the kNN sets) are timed by wrapping them in this process (stence is not changed)."""
    import pandas as pd

    import stence.train.pretrain_loop as loop
    from stence.pipelines.pretrain import run_pretrain

    cfg = bench_config(size_dir)
    parts: dict[str, float] = {}

    def timed(name: str, fn):
        def wrapper(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                parts[name] = parts.get(name, 0.0) + time.perf_counter() - t0
        return wrapper

    for name in ("retrieval_metrics", "knn_auroc_ci", "embed_ecgs"):
        setattr(loop, name, timed(name, getattr(loop, name)))
    out = run_pretrain(cfg)
    m = pd.read_parquet(size_dir / "cohort" / "manifest.parquet", columns=["split"])["split"].value_counts()
    return {"records": int(m.get("train", 0)), "record_unit": "training pair (one epoch)",
            "cores": cfg.train.cpus_per_worker,
            "cores_note": f"local mode, in-process, torch threads = train.cpus_per_worker = {cfg.train.cpus_per_worker}",
            "extra": {"pairs_by_split": {k: int(v) for k, v in m.items()},
                      "seconds_in": {k: round(v, 3) for k, v in parts.items()},
                      "knn_auroc": out["metrics"].get("val/knn_auroc")}}


STAGE_FNS = {"synth": stage_synth, "floor": stage_floor, "ingest": stage_ingest, "features": stage_features,
             "pretrain": stage_pretrain}


def _stage_child(name: str, size_dir: Path, params: dict, result: Path) -> None:
    """Child process entry: run one stage, write its figures (and its own getrusage) to `result`."""
    import resource

    def cpu() -> tuple[float, float]:
        me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return me.ru_utime + me.ru_stime, kids.ru_utime + kids.ru_stime

    (self0, kids0), t0 = cpu(), time.perf_counter()  # after interpreter start-up and this module's imports
    r = STAGE_FNS[name](size_dir, params)
    seconds = time.perf_counter() - t0
    self1, kids1 = cpu()
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    r.update(seconds=r.pop("seconds_timed", seconds),  # the floor times its reading loop only, features its last try
             maxrss_self=me.ru_maxrss * 1024, maxrss_children=kids.ru_maxrss * 1024,  # Linux: KiB
             cpu_s_rusage=(self1 - self0) + (kids1 - kids0),  # the stage's own CPU and that of its reaped children
             cpu_s_pre=self0)  # spent before the stage (start-up, imports): taken off the sampled CPU
    result.write_text(json.dumps(r))


def run_stage(name: str, size_dir: Path, params: dict, disk_watch: Path | None = None,
              log: Path | None = None) -> dict:
    """Run one stage in a fresh process, sampling its process tree; the stage's raw figures."""
    result = size_dir / f".{name}.result.json"
    result.unlink(missing_ok=True)
    env = {**os.environ, **PIN_ENV, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "bench.bench_growth", "--stage", name, "--size-dir", str(size_dir),
           "--params", json.dumps(params), "--result", str(result)]
    out = open(log, "ab") if log else subprocess.DEVNULL
    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    try:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
        sampler = TreeSampler(proc.pid, disk=disk_watch)
        sampler.start()
        rc = proc.wait()
        sampler.stop()
    finally:
        if log:
            out.close()
    if rc != 0 or not result.exists():
        raise RuntimeError(f"stage {name} failed (exit {rc}); see {log or 'its output'}")
    r = json.loads(result.read_text())
    result.unlink()
    r["process_wall_s"] = time.perf_counter() - t0  # with interpreter start and imports
    r["sampled"] = sampler.stats()
    r["loadavg_1min"] = [round(load0, 2), round(os.getloadavg()[0], 2)]  # machine load at start and end
    if disk_watch is not None:
        r["sampled"]["disk_peak"] = max(sampler.disk_peak, tree_bytes(disk_watch))
    return r


# ------------------------------------------------------------------------------------------------------
# the driver


def machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        mem = int(next(ln for ln in Path("/proc/meminfo").read_text().splitlines()
                       if ln.startswith("MemTotal")).split()[1]) * 1024
    except (OSError, StopIteration, ValueError):
        mem = None
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_bytes": mem, "python": platform.python_version(),
            "platform": platform.platform(), "nice": os.nice(0) if hasattr(os, "nice") else None}


def filesystem_of(path: Path) -> str:
    """The file system type under `path` (from /proc/mounts), e.g. ext4 (disk) or tmpfs (RAM)."""
    best, kind = "", "?"
    try:
        real = str(path.resolve())
        for line in Path("/proc/mounts").read_text().splitlines():
            _, mnt, fstype = line.split()[:3]
            if (real == mnt or real.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best):
                best, kind = mnt, fstype
    except OSError:
        pass
    return kind


def _claim_size_dir(size_dir: Path) -> None:
    if size_dir.exists():
        if not (size_dir / MARK).exists():
            raise SystemExit(f"{size_dir} exists and was not made by bench_growth; choose another --work")
        shutil.rmtree(size_dir)
    size_dir.mkdir(parents=True)
    (size_dir / MARK).write_text("made by bench/bench_growth.py; removed by its next run\n")


def _resumable(size_dir: Path, resume: bool) -> bool:
    """With --resume, a size folder this benchmark made is kept (its saved stages and raw export reused)."""
    if resume and (size_dir / MARK).exists():
        return True
    _claim_size_dir(size_dir)
    return False


def _export_counts(raw: Path) -> dict:
    """ECGs, patients and views of a synthetic export, from its index tables (no file is read)."""
    import pandas as pd

    ecg = pd.read_csv(raw / "ecg_index.csv")
    out = {"ecgs": len(ecg), "patients": int(ecg["patient_id"].nunique()) if "patient_id" in ecg else None}
    out["views"] = sum(1 for f in (raw / "angio").rglob("*") if f.is_file())
    return out


def run_size(n: int, work: Path, processes: int = 2, keep: bool = False, floor_max: int = 20_000,
             ecgs_per_patient: int = ECGS_PER_PATIENT, verbose: bool = True, resume: bool = False) -> dict:
    """All stages at one size under work/n<N>; the per-stage figures. Each stage's raw figures are saved in
    work/n<N>/stage_results/, and with `resume` a saved stage is not run again; a kept raw export whose synth
    stage was not saved is used as it is, and that size then has no synth figures."""
    size_dir = work / f"n{n}"
    resumed = _resumable(size_dir, resume)
    saved = size_dir / "stage_results"
    saved.mkdir(exist_ok=True)
    log = size_dir / "stages.log"
    say = print if verbose else (lambda *a, **k: None)
    raws: dict[str, dict] = {}
    params = {"n": n, "processes": processes, "floor_max": floor_max, "ecgs_per_patient": ecgs_per_patient}
    raw_bytes = cohort_bytes = 0
    for name in STAGES:
        say(f"  N={n}: {name} ...", end=" ", flush=True)
        f = saved / f"{name}.json"
        if resumed and f.exists():
            raws[name] = json.loads(f.read_text())
            say("saved figures reused")
        elif resumed and name == "synth" and (size_dir / "raw").exists():
            say("raw export reused; not measured in this run")
        else:
            raws[name] = run_stage(name, size_dir, params, disk_watch=size_dir if name == "ingest" else None,
                                   log=log)
            f.write_text(json.dumps(raws[name]))
            say(f"{raws[name]['seconds']:.1f} s")
        if name == "synth":
            raw_bytes = tree_bytes(size_dir / "raw") if "synth" in raws or (size_dir / "raw").exists() else 0
            counts = _export_counts(size_dir / "raw") if (size_dir / "raw").exists() else {}
        elif name == "ingest":
            cohort_bytes = tree_bytes(size_dir / "cohort") + tree_bytes(size_dir / "cohort.site-identifiers")
            if not keep:
                shutil.rmtree(size_dir / "raw", ignore_errors=True)
    if "synth" in raws:
        n_ecgs, patients, views = (int(raws["synth"]["records"]), raws["synth"]["extra"]["patients"],
                                   raws["synth"]["extra"]["views"])
    else:
        n_ecgs, patients, views = counts["ecgs"], counts["patients"], counts["views"]
    disks = {"synth": (raw_bytes, "raw export (ecg/ + angio/ + tables)"),
             "floor": (0, "nothing"),
             "ingest": (cohort_bytes, "cohort (tables, cache/ecg.npy, cache/ecg_source.npy, cache/frames.npy) "
                                      "+ site map"),
             "features": (tree_bytes(size_dir / "cohort" / "features"), "feature cache"),
             "pretrain": (tree_bytes(size_dir / "storage"), "checkpoints and export")}
    stages = {name: stage_figures(raws[name], n_ecgs, *disks[name]) for name in STAGES if name in raws}
    return {"n_ecgs": n_ecgs, "n_requested": n, "patients": patients, "views": views, "stages": stages,
            "peak_work_disk_bytes": raws["ingest"]["sampled"].get("disk_peak", 0),
            "ingest_vs_floor": None}


def run(sizes: list[int], work: Path, processes: int = 2, keep: bool = False, floor_max: int = 20_000,
        ecgs_per_patient: int = ECGS_PER_PATIENT, command: str = "", verbose: bool = True,
        projection_n: int = 100_000, partial: Path | None = None, resume: bool = False) -> dict:
    """Every size, smallest first; with `partial`, the report so far is written there after each size."""
    results = []
    settings = {"processes": processes, "ecgs_per_patient": ecgs_per_patient, "views_per_study": VIEWS,
                "frames_per_view": FRAMES, "config": "configs/demo.yaml + train.workers=0 optim.epochs=1 "
                "tracking.enabled=false", "floor_max": floor_max, "work_filesystem": filesystem_of(work),
                "threads_per_process": 1}
    for n in sorted(sizes):
        t0 = time.perf_counter()
        s = run_size(n, work, processes, keep, floor_max, ecgs_per_patient, verbose, resume)
        s["total_wall_s"] = round(time.perf_counter() - t0, 1)
        results.append(s)
        if partial is not None:
            partial.parent.mkdir(parents=True, exist_ok=True)
            partial.write_text(json.dumps({**finish(results, command, machine(), settings, projection_n),
                                           "complete": len(results) == len(sizes)}, indent=2))
    return {**finish(results, command, machine(), settings, projection_n), "complete": True}


def finish(sizes: list[dict], command: str, machine_info: dict, settings: dict, projection_n: int = 100_000) -> dict:
    """The report: per-size figures, growth ratios, targets and the projection."""
    for s in sizes:
        s["ingest_vs_floor"] = floor_fraction(s)
        s["ingest_vs_floor_cpu"] = floor_fraction(s, "records_per_cpu_s")
    grow = growth(sizes)
    return {"benchmark": "growth", "command": command, "machine": machine_info, "settings": settings,
            "sizes": sizes, "growth": grow, "targets": targets(sizes, grow), "projection_n": projection_n,
            "projection": project(sizes, projection_n)}


def main(argv: list[str] | None = None) -> dict | None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000], help="ECG records per point")
    p.add_argument("--work", help="work folder (kept); default a temporary one, removed at the end")
    p.add_argument("--processes", type=int, default=2, help="ingest decode processes")
    p.add_argument("--keep", action="store_true", help="keep the raw export after ingest")
    p.add_argument("--floor-max", type=int, default=20_000, help="records the floor reads (evenly strided); 0 = all")
    p.add_argument("--ecgs-per-patient", type=int, default=ECGS_PER_PATIENT)
    p.add_argument("--out", default="bench/results/growth.json")
    p.add_argument("--resume", action="store_true",
                   help="with --work: reuse the stages saved under each size folder (and a kept raw export)")
    p.add_argument("--from-json", help="recompute ratios, targets and the table of a saved report; run nothing")
    # internal: one stage in this (fresh) process
    p.add_argument("--stage", choices=STAGES, help=argparse.SUPPRESS)
    p.add_argument("--size-dir", help=argparse.SUPPRESS)
    p.add_argument("--params", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.stage:
        _stage_child(args.stage, Path(args.size_dir), json.loads(args.params), Path(args.result))
        return None
    if args.from_json:
        result = json.loads(Path(args.from_json).read_text())
        result = finish(result["sizes"], result.get("command", ""), result.get("machine", {}),
                        result.get("settings", {}), result.get("projection_n", 100_000))
        print(markdown(result))
        return result
    command = " ".join(["python -m bench.bench_growth", *(argv if argv is not None else sys.argv[1:])])
    tmp = None if args.work else tempfile.mkdtemp(prefix="bench-growth-")
    work = Path(args.work or tmp).resolve()
    work.mkdir(parents=True, exist_ok=True)
    print(f"growth benchmark: sizes {sorted(args.sizes)}, work {work} ({filesystem_of(work)})", flush=True)
    try:
        result = run(args.sizes, work, args.processes, args.keep, args.floor_max, args.ecgs_per_patient, command,
                     partial=Path(args.out), resume=args.resume)
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    table = markdown(result)
    out.with_suffix(".md").write_text(f"`{command}`\n\n{table}\n")
    print(table)
    print(f"wrote {out} and {out.with_suffix('.md')}")
    return result


if __name__ == "__main__":
    main()
