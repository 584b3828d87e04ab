"""Memory that stays flat in the cohort size: one shared, compact ECG cache reader per process, validation
retrieval metrics without the (N, N) matrix, and synth writing its per-record rows as it goes."""

from __future__ import annotations

import csv
import datetime as dt
import json
import multiprocessing as mp
import pickle
import shutil
import tracemalloc
import types
from pathlib import Path

import numpy as np
import pytest
import torch

import stence.data.synth as synth
import stence.train.pretrain_loop as loop
from stence.config import STANDARD_LEADS, Config
from stence.data.cohort_io import Cohort
from stence.data.contract import project_contract
from stence.data.contract_cache import ContractSignals, OffsetTable, contract_signals
from stence.data.datasets import EcgDataset, PairedDataset
from stence.data.synth import SynthConfig, load_truth, write_cohort
from stence.losses import clip_loss
from stence.outputs import MARKER

# --- one compact ContractSignals per cache file and process -------------------------------------------


def test_offset_table_reads_as_the_dict_of_tuples_it_replaces() -> None:
    rng = np.random.default_rng(0)
    ids = [f"E-{int(i):x}" for i in rng.integers(0, 40, size=60)] + ["Ä-ümlaut", "E", "E-1"]  # repeats
    table = rng.integers(0, 10**9, size=(len(ids), 2))
    ref = {e: (int(o), int(n)) for e, (o, n) in zip(ids, table, strict=True)}  # the former offsets
    got = OffsetTable(ids, table)
    assert len(got) == len(ref) and list(got) == list(ref) and dict(got.items()) == ref and got == ref
    for e, v in ref.items():
        assert got[e] == v and type(got[e][0]) is int and e in got
    for missing in ("E-", "E-1x", "E-ffffffffffffffffffffffff", "", 7):
        assert missing not in got
        with pytest.raises(KeyError):
            got[missing]  # type: ignore[index]
    with pytest.raises(KeyError):
        OffsetTable([], np.zeros((0, 2)))["E"]


@pytest.fixture(scope="module")
def cohort(tiny_cohort: Path) -> Cohort:
    return Cohort.open(tiny_cohort)


def pretraining_sets(cohort: Cohort) -> list:
    """The datasets pretrain_loop builds in one process: paired train/val and the kNN probe's ECG sets."""
    cfg = Config()
    return [PairedDataset(cohort, "train", cfg.data, train=True), PairedDataset(cohort, "val", cfg.data),
            *[EcgDataset(cohort, s, cfg.data, cfg.train.knn_task) for s in ("train", "val")]]


def test_datasets_of_a_process_share_one_reader_and_one_memmap(cohort: Cohort) -> None:
    sets = pretraining_sets(cohort)
    again = contract_signals(Cohort.open(cohort.root), project_contract(Config().data))  # another Cohort object
    assert all(ds.signals is again for ds in sets)
    assert len({id(ds.signals.cache) for ds in sets}) == 1
    ecgs = cohort.ecgs
    for e, off, n in zip(ecgs["ecg_id"], ecgs["offset"], ecgs["n_samples"], strict=True):  # as before
        assert again.offsets[e] == (int(off), int(n))
        np.testing.assert_array_equal(again.signal(e), cohort.ecg_signal(e))
    blob = pickle.dumps(sets[0].signals)
    assert b"memmap" not in blob and pickle.loads(blob) is again  # no memmap; rejoins the shared one
    plain = ContractSignals(again.path, dict(again.offsets))  # made by hand: not shared, still pickles
    back = pickle.loads(pickle.dumps(plain))
    assert back is not plain and back == plain and back.offsets == again.offsets


def _unpickle_in_worker(blobs: list[bytes], queue: mp.Queue) -> None:
    sets = [pickle.loads(b) for b in blobs]
    sig = sets[0].signals
    ecg_id = sets[0].rows["ecg_id"].iloc[0]
    queue.put({"one_reader": all(ds.signals is sig for ds in sets),
               "one_memmap": len({id(ds.signals.cache) for ds in sets}) == 1,
               "signal": np.asarray(sig.signal(ecg_id)), "ecg_id": ecg_id})


def test_unpickled_datasets_share_one_reader_in_a_worker(cohort: Cohort) -> None:
    sets = pretraining_sets(cohort)
    blobs = [pickle.dumps(ds) for ds in sets]  # pickled one by one, as for separate loaders
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_unpickle_in_worker, args=(blobs, queue))
    proc.start()
    out = queue.get(timeout=300)
    proc.join(timeout=60)
    assert proc.exitcode == 0 and out["one_reader"] and out["one_memmap"]
    np.testing.assert_array_equal(out["signal"], cohort.ecg_signal(out["ecg_id"]))


def test_a_remade_cache_file_is_not_served_stale(cohort: Cohort, tmp_path: Path) -> None:
    root = tmp_path / "cohort"
    shutil.copytree(cohort.root, root)
    c = Cohort.open(root)
    contract = project_contract(Config().data)
    first = contract_signals(c, contract)
    ecg_id = c.ecgs["ecg_id"].iloc[0]
    before = np.array(first.signal(ecg_id))
    path = root / "cache" / "ecg.npy"
    remade = np.load(path) + 1.0  # a re-made cache: another file at the same path
    path.unlink()
    np.save(path, remade)
    second = contract_signals(Cohort.open(root), contract)
    assert second is not first
    np.testing.assert_array_equal(second.signal(ecg_id), before + 1.0)
    assert contract_signals(c, contract) is second


# --- retrieval metrics in row blocks ------------------------------------------------------------------


def full_matrix_metrics(ecg: np.ndarray, angio: np.ndarray, scale: float) -> dict[str, float]:
    """The former implementation: the whole (N, N) similarity matrix."""
    e, a = torch.from_numpy(ecg), torch.from_numpy(angio)
    loss = float(clip_loss(e, a, torch.tensor(scale), gather=False))
    sim = e @ a.T  # (N, N)
    target = torch.arange(len(e))
    out = {"val/clip_loss": loss}
    for name, s in (("e2a", sim), ("a2e", sim.T)):
        rank = (s > s[target, target][:, None]).sum(1)  # (N,)
        out[f"val/r1_{name}"] = float((rank < 1).float().mean())
        out[f"val/r5_{name}"] = float((rank < 5).float().mean())
    return out


def unit_rows(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)  # (N, D)


def validation_like(n: int, d: int, seed: int, ties: bool = False) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    if ties:  # small integer entries: many exactly equal similarities, and repeated rows
        e = rng.integers(-1, 2, size=(n, d)).astype(np.float32)
        a = e.copy()
        a[rng.random(n) < 0.5] = rng.integers(-1, 2, size=d)
        a[1::3] = a[0]
        return e, a
    e = unit_rows(rng.standard_normal((n, d)))
    return e, unit_rows(e + 0.9 * rng.standard_normal((n, d)))


@pytest.mark.parametrize(("n", "block", "ties"), [(1, 4, False), (3, 8, False), (50, 64, False),
                                                  (101, 16, False), (128, 16, False), (97, 10, True),
                                                  (9, 4, True)])
def test_blockwise_metrics_equal_the_full_matrix_ones(monkeypatch, n: int, block: int, ties: bool) -> None:
    monkeypatch.setattr(loop, "_BLOCK_ROWS", block)
    e, a = validation_like(n, 12, seed=n + block, ties=ties)
    scale = 14.285714
    got, ref = loop.retrieval_metrics(e, a, scale), full_matrix_metrics(e, a, scale)
    assert set(got) == set(ref)
    for k in ref:
        if k == "val/clip_loss":
            assert got[k] == pytest.approx(ref[k], rel=2e-6, abs=1e-6)
        else:
            assert got[k] == ref[k], k  # exact: same ranks, ties counted as before (strictly greater)
    if ties:
        assert any(0 < ref[k] < 1 for k in ref if "r1" in k)  # the ties mattered


def test_blockwise_metrics_never_make_the_whole_matrix(monkeypatch) -> None:
    n, block = 300, 64
    monkeypatch.setattr(loop, "_BLOCK_ROWS", block)
    shapes: list[tuple[int, ...]] = []
    matmul = torch.Tensor.__matmul__

    def spy(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        z = matmul(x, y)
        shapes.append(tuple(z.shape))
        return z

    monkeypatch.setattr(torch.Tensor, "__matmul__", spy)
    e, a = validation_like(n, 8, seed=1)
    loop.retrieval_metrics(e, a, 10.0)
    assert shapes and max(s[0] for s in shapes) <= block and all(s == (s[0], n) for s in shapes)
    monkeypatch.setattr(loop, "_BLOCK_ROWS", 1024)
    assert all((i1 - i0) * 100_000 <= loop._BLOCK_ELEMS for i0, i1 in loop._row_blocks(100_000))


# --- synth writes its rows and answer key as it goes --------------------------------------------------


@pytest.mark.parametrize("truth", [
    {"params": {"a": 1.5, "fs": [500, 250]}, "corrupt": [], "echonext": {}, "patients": []},
    {"params": {}, "corrupt": [{"kind": "x", "path": "p\nq"}], "echonext": {"train": 3},
     "patients": [{"name": "Ä^B", "studies": [{"angles": [[1.0, -2.5]], "segments": {"1": 0, "10": 90}}],
                   "ecgs": [], "empty": {}}, {"name": "C", "ecgs": [{"fs": 500, "leads_shuffled": True}]}]},
])
def test_streamed_answer_key_is_json_dumps_byte_for_byte(tmp_path: Path, truth: dict) -> None:
    part = tmp_path / "patients.part"
    part.write_text("".join(synth._truth_item(p, first=k == 0) for k, p in enumerate(truth["patients"])))
    with open(part) as fh:
        synth._write_truth(tmp_path / "t.json", {k: v for k, v in truth.items() if k != "patients"}, fh)
    assert (tmp_path / "t.json").read_text() == json.dumps(truth, indent=1, sort_keys=True) + "\n"


def test_synth_files_are_the_whole_list_writes(tmp_path: Path) -> None:
    cfg = SynthConfig.preset("tiny", patients=4, corrupt_fraction=0.3, seed=8)
    out = tmp_path / "raw"
    write_cohort(out, cfg)
    truth = load_truth(out)
    assert (out / synth.TRUTH_FILE).read_text() == json.dumps(truth, indent=1, sort_keys=True) + "\n"
    with open(out / "ecg_index.csv", newline="") as fh:
        rows = list(csv.reader(fh))
    good = [e["record"] for p in truth["patients"] for e in p["ecgs"]]
    bad = [c["record"] for c in truth["corrupt"] if "record" in c]
    assert rows[0] == ["record", "patient_id", "acquisition_date"] and bad
    assert [r[0] for r in rows[1:]] == good + bad  # the good rows, then the corrupt ones, as before
    assert sorted(p.name for p in out.iterdir()) == sorted(  # nothing left behind
        [MARKER, "angio", "annotations.csv", "ecg", "ecg_index.csv", synth.TRUTH_FILE])


def test_synth_keeps_nothing_per_patient_or_record(tmp_path: Path, monkeypatch) -> None:
    """With the record and study writers stubbed out, write_cohort's peak does not grow with the cohort: it
    held ~13 KB per patient of rows and answer-key text, and ~22 KB per patient of plan, before."""
    monkeypatch.setattr(synth, "make_record", lambda cfg, p, name, j: types.SimpleNamespace(
        name=name, fs=500, leads=STANDARD_LEADS, when=dt.datetime.combine(p.study_date, dt.time(8, 0))))
    monkeypatch.setattr(synth, "write_ecg", lambda folder, rec, fmt, person: rec.name)
    monkeypatch.setattr(synth, "write_study", lambda out, cfg, p: [f"angio/{p.folder}/view_{k}.dcm"
                                                                   for k in range(cfg.views)])
    cfg = SynthConfig.preset("tiny", patients=1500, corrupt_fraction=0, echonext=0, seed=2)
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        write_cohort(tmp_path / "raw", cfg)
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    assert peak < 3_000_000, f"{peak / cfg.patients:.0f} B per patient"
    assert len((tmp_path / "raw" / "ecg_index.csv").read_text().splitlines()) == 1 + 2 * cfg.patients


def test_the_patient_plan_is_drawn_on_access_and_equal_to_itself() -> None:
    cfg = SynthConfig.preset("tiny", patients=40, seed=4)
    plan = synth.plan_patients(cfg, cfg.patients)
    same = lambda a, b: pickle.dumps(a) == pickle.dumps(b)  # noqa: E731 - Patients hold arrays
    assert len(plan) == 40 and same(plan[7], plan[7]) and same(plan[-1], plan[39])
    assert same(plan[2:4], [plan[2], plan[3]]) and not same(plan[2], plan[3])
    assert [p.index for p in plan] == list(range(40)) and len({p.patient_id for p in plan}) == 40
    later = synth.plan_patients(cfg, 3, first_index=40)  # the corrupt studies' extra patients
    assert [p.index for p in later] == [40, 41, 42] and not {p.patient_id for p in later} & {p.patient_id for p in plan}
    with pytest.raises(IndexError):
        plan[40]


# --- the cohort fingerprint samples its caches with pread, not a memory map ------------------------------


@pytest.mark.parametrize("shape,dtype", [((12, 70_001), np.float32), ((3, 2, 9, 9), np.float16), ((5,), np.float64),
                                         ((0, 4), np.float32)])
def test_strided_sample_reads_the_bytes_of_the_memmap_stride(tmp_path: Path, shape, dtype) -> None:
    from stence.data.cohort_io import strided_sample

    arr = np.random.default_rng(1).standard_normal(shape).astype(dtype)
    np.save(tmp_path / "a.npy", arr)
    for n in (1, 7, 65536):
        step = max(1, arr.size // n)
        got = strided_sample(tmp_path / "a.npy", n)
        assert got == (arr.shape, arr.dtype, np.ascontiguousarray(arr.reshape(-1)[::step]).tobytes())


# --- the kNN probe's distances in bounded blocks ----------------------------------------------------------


def test_knn_probe_memory_does_not_grow_with_the_validation_set() -> None:
    from stence.eval.metrics import knn_auroc_ci

    rng = np.random.default_rng(0)
    train, ty = rng.standard_normal((20_000, 32)).astype(np.float32), rng.integers(0, 2, 20_000)
    peaks = []
    for n_val in (2_000, 8_000):  # a full (n_val, 20 000) float64 matrix: 320 MB, then 1.3 GB
        val, vy = rng.standard_normal((n_val, 32)).astype(np.float32), rng.integers(0, 2, n_val)
        tracemalloc.start()
        try:
            out = knn_auroc_ci(train, ty, val, vy, k=5)
            peaks.append(tracemalloc.get_traced_memory()[1])
        finally:
            tracemalloc.stop()
        assert out["auroc_lo"] <= out["auroc"] <= out["auroc_hi"]
    assert max(peaks) < 200e6, peaks  # distance blocks of KNN_WORKING_MB, never the whole matrix
