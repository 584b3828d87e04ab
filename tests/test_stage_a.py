"""Stage A: the angiography stenosis model trained end to end (conv-stem frame encoder + SegmentMIL aggregator)
on the cached key frames, its export for stage B, and the renderer properties it relies on."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from stence.config import Config, apply_overrides
from stence.data.cohort_io import Cohort
from stence.data.datasets import StudyDataset, collate_paired
from stence.data.frame_augment import random_affine
from stence.data.synth_angio import View, sample_tree, vessel_layers
from stence.eval.metrics import auroc
from stence.models.aggregator import SegmentMILAggregator
from stence.models.angio_e2e import (
    AngioEndToEnd,
    load_stage_a_export,
    save_frame_encoder,
    trains_frame_encoder,
)
from stence.models.frame_encoder import load_dinov2_checkpoint
from stence.models.registry import create_frame_encoder
from stence.train.features import feature_key

# ---------------------------------------------------------------------------------------------------
# renderer: a stenosis is a visible, graded waist (spec: "angiography carries the signal strongly")


def test_lesion_darkness_loss_grows_with_degree_and_severe_lesions_show() -> None:
    tree = sample_tree(np.random.default_rng(0))
    view = View(45.0, 0.0)
    full = vessel_layers(tree, {}, view, 64)[0]
    for seg in (1, 2, 7):  # proximal and mid RCA, mid LAD: well seen in this view
        lost = [float((full - vessel_layers(tree, {seg: d}, view, 64)[0]).sum()) for d in (30, 50, 70, 90)]
        assert lost == sorted(lost) and lost[0] > 0, (seg, lost)
        # a 70 % lesion takes away about 25 fully dark pixels' worth of contrast (a chain-of-discs projection
        # of a short lesion: about 13), clearly more than a 50 % one
        assert lost[2] > 20.0 and lost[2] > 1.25 * lost[1], (seg, lost)


def test_tight_lesion_is_not_covered_by_the_lumen_on_either_side() -> None:
    tree = sample_tree(np.random.default_rng(1))
    view = View(45.0, 0.0)
    full = vessel_layers(tree, {}, view, 64)[0]
    tight = vessel_layers(tree, {2: 90}, view, 64)[0]
    # pixels that lose most of their contrast: a pale gap in the vessel, not just thinner edges
    assert ((full > 0.8) & (tight < 0.4 * full)).sum() >= 20  # (chain of discs, short lesion: 14)


# ---------------------------------------------------------------------------------------------------
# model pieces


def _e2e(seed: int = 0) -> AngioEndToEnd:
    torch.manual_seed(seed)
    enc = create_frame_encoder("convstem_tiny", feature_dim=16)
    agg = SegmentMILAggregator(feature_dim=16, d=16, heads=2, ffn=32, layers=1, dropout=0.0)
    return AngioEndToEnd(enc, agg)


def test_end_to_end_model_ignores_padded_views_and_trains_the_encoder() -> None:
    model = _e2e().eval()
    g = torch.Generator().manual_seed(0)
    frames = torch.rand(2, 3, 64, 64, generator=g)
    angles = torch.randn(2, 3, 2, generator=g) * 30
    mask = torch.tensor([[True, True, False], [True, True, True]])
    out = model(frames, mask, angles)["stenosis_logits"]
    assert out.shape == (2, 11)
    junk = frames.clone()
    junk[0, 2] = torch.rand(64, 64, generator=g)  # whatever sits in a padded slot changes nothing
    torch.testing.assert_close(model(junk, mask, angles)["stenosis_logits"], out)
    alone = model(frames[:1, :2], mask[:1, :2], angles[:1, :2])["stenosis_logits"]
    torch.testing.assert_close(alone, out[:1], atol=1e-5, rtol=1e-5)
    model.train()
    model(frames, mask, angles)["stenosis_logits"].sum().backward()
    first_conv = model.frame_encoder.patch_embed.stem[0][0].weight
    assert first_conv.grad is not None and first_conv.grad.abs().sum() > 0


def test_exported_frame_encoder_loads_with_the_dinov2_loader(tmp_path: Path) -> None:
    enc = _e2e(seed=1).frame_encoder
    with torch.no_grad():  # move BN statistics off their defaults so that buffers are checked too
        for m in enc.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 2.0)
    enc.eval()
    path = save_frame_encoder(tmp_path / "frame_encoder.pt", enc, {"feature": {}}, extra={"epoch": 3})
    fresh = create_frame_encoder("convstem_tiny", feature_dim=16)
    load_dinov2_checkpoint(fresh, str(path)).eval()
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(fresh(x), enc(x))
    with pytest.raises(ValueError):  # the strict loader refuses a different architecture
        load_dinov2_checkpoint(create_frame_encoder("dinov2_tiny", feature_dim=16), str(path))


def test_train_frame_encoder_auto_follows_the_checkpoint() -> None:
    cfg = Config()
    assert trains_frame_encoder(cfg)  # random init: frozen features would be useless
    assert not trains_frame_encoder(apply_overrides(cfg, {"feature.frame_checkpoint": "/w/dinov2.pth"}))
    assert trains_frame_encoder(apply_overrides(cfg, {"feature.frame_checkpoint": "/w/dinov2.pth",
                                                      "stage_a.train_frame_encoder": "true"}))
    assert not trains_frame_encoder(apply_overrides(cfg, {"stage_a.train_frame_encoder": False}))
    with pytest.raises(ValueError, match="auto"):
        trains_frame_encoder(apply_overrides(cfg, {"stage_a.train_frame_encoder": "sometimes"}))


def test_checkpoint_metric_averages_patient_artery_and_segment_levels() -> None:
    from stence.train.angio_loop import ANGIO_METRIC, target_aurocs

    rng = np.random.default_rng(0)
    y = (rng.random((40, 11)) < 0.3).astype(np.float32)
    y[:, 3] = 0.0  # a segment without positives: undefined, left out
    p = np.clip(y * 0.5 + rng.random((40, 11)) * 0.7, 0, 1)  # informative but imperfect scores
    m = target_aurocs(y, p)
    assert ANGIO_METRIC == "val/auroc_mean" and not np.isfinite(m["val/auroc_seg1"])
    levels = [m["val/auroc_patient"], m["val/auroc_artery"], m["val/auroc_segment"]]
    assert all(0.5 < v < 1.0 for v in levels)
    assert m[ANGIO_METRIC] == pytest.approx(np.mean(levels))
    p_bad = p.copy()
    p_bad[:, 3:] = rng.random((40, 8))  # segment queries at chance: the checkpoint ranks lower,
    worse = target_aurocs(y, p_bad)  # although its patient AUROC is the same
    assert worse["val/auroc_patient"] == m["val/auroc_patient"] and worse[ANGIO_METRIC] < m[ANGIO_METRIC] - 0.05


def test_feature_cache_key_ignores_stage_a_training_options() -> None:
    cohort = SimpleNamespace(fingerprint="abc", meta={"data_config": {"frame_size": 64}})
    cfg = Config()
    key = feature_key(cohort, cfg)
    same = apply_overrides(cfg, {"stage_a.train_frame_encoder": "false", "stage_a.encoder_lr_scale": 3.0,
                                 "stage_a.train_rotate_deg": 0.0})
    assert feature_key(cohort, same) == key
    assert feature_key(cohort, apply_overrides(cfg, {"feature.frame_encoder": "dinov2_tiny"})) != key


def test_random_affine_is_seeded_and_identity_without_range() -> None:
    frame = np.random.default_rng(0).random((32, 32)).astype(np.float32)
    np.testing.assert_allclose(random_affine(frame, np.random.default_rng(1), 0.0, 0.0, 0.0), frame, atol=1e-6)
    a = random_affine(frame, np.random.default_rng(2))
    np.testing.assert_array_equal(a, random_affine(frame, np.random.default_rng(2)))
    assert a.shape == frame.shape and not np.allclose(a, frame)
    yy, xx = np.mgrid[0:33, 0:33] - 16.0
    blob = np.exp(-(yy**2 + xx**2) / 50.0).astype(np.float32)  # round, centred: rotation leaves it alone
    turned = random_affine(blob, np.random.default_rng(3), max_deg=45.0, max_scale=0.0, max_shift=0.0)
    np.testing.assert_allclose(turned, blob, atol=0.03)  # up to bilinear smoothing
    moved = random_affine(blob, np.random.default_rng(3), max_deg=0.0, max_scale=0.0, max_shift=0.1)
    assert np.abs(moved - blob).max() > 0.05  # a shift does move it


# ---------------------------------------------------------------------------------------------------
# stage A on a small cohort (local mode), and its features for stage B


@pytest.fixture(scope="module")
def small_cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """60 patients, 3 views of 3 frames: 36 training studies, 24 held out (val + test)."""
    from stence.data.ingest import ingest
    from stence.data.synth import SynthConfig, write_cohort

    root = tmp_path_factory.mktemp("stage_a")
    write_cohort(root / "raw", SynthConfig.preset("tiny", patients=60, views=3, frames=3, ecgs_per_patient=1,
                                                  duration_s=2.0, seed=3))
    ingest(root / "raw", root / "cohort", Config(), processes=2)
    return root / "cohort"


def _stage_a_cfg(cohort: Path, storage: Path, **extra: object) -> Config:
    return apply_overrides(Config(), {
        "data.cohort": str(cohort), "train.storage_path": str(storage), "train.workers": 0,
        "train.name": "stage-a", "tracking.enabled": False, "optim.batch_size": 8, "optim.lr_angio": 1e-3,
        "feature.variants": 1, **extra,
    })


def _predict(export: Path, cohort: Path, splits: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
    """(targets (N, 11), probabilities (N, 11)) of the exported stage-A pair on the studies of `splits`."""
    model = load_stage_a_export(export, Config().feature.frame_encoder)
    ys, ps = [], []
    for split in splits:
        ds = StudyDataset(Cohort.open(cohort), split, Config().data, None, train=False)
        batch = collate_paired([ds[i] for i in range(len(ds))])
        with torch.no_grad():
            logits = model(batch["frames"], batch["view_mask"], batch["angles"])["stenosis_logits"]
        ys.append(batch["targets"].numpy())
        ps.append(torch.sigmoid(logits).numpy())
    return np.concatenate(ys), np.concatenate(ps)


@pytest.fixture(scope="module")
def stage_a(small_cohort: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    from stence.pipelines.angio import run_angio

    cfg = _stage_a_cfg(small_cohort, tmp_path_factory.mktemp("storage"), **{"optim.epochs": 40})
    return {**run_angio(cfg), "cfg": cfg}


def test_study_dataset_gives_key_frame_zero_in_eval_and_seeded_augmentation_in_training(small_cohort) -> None:
    cohort = Cohort.open(small_cohort)
    val = StudyDataset(cohort, "val", Config().data, None, train=False)
    rows = cohort.views_of_study[val.rows["study_id"].iloc[0]]
    np.testing.assert_array_equal(val[0]["frames"].numpy(), np.asarray(cohort.frame_cache[rows, 0], np.float32))
    data = apply_overrides(Config(), {"data.view_drop_max": 0.0}).data
    train = StudyDataset(cohort, "train", data, None, train=True, seed=5, rotate_deg=20.0)
    a, b = train[0]["frames"], train[0]["frames"]
    torch.testing.assert_close(a, b)  # same (seed, epoch, index): same augmentation
    plain = StudyDataset(cohort, "train", data, None, train=False)[0]["frames"]
    assert a.shape == plain.shape and (a - plain).abs().mean() > 0.01  # augmented
    train.set_epoch(1)
    assert (train[0]["frames"] - a).abs().mean() > 0.01  # differently in the next epoch


@pytest.mark.ray
def test_stage_a_learns_beyond_chance_and_exports_both_parts(stage_a: dict, small_cohort: Path) -> None:
    export = Path(stage_a["checkpoint"]).parent
    assert Path(stage_a["frame_encoder"]) == export / "frame_encoder.pt" and export.joinpath("aggregator.pt").exists()
    y, p = _predict(export, small_cohort, ("train",))
    assert auroc(y[:, 0], p[:, 0]) > 0.85  # it fits its training studies (chance: 0.5)
    y, p = _predict(export, small_cohort, ("val", "test"))
    held_out = auroc(y[:, 0], p[:, 0])
    assert held_out > 0.65, held_out  # and generalises to 24 unseen studies


@pytest.mark.ray
def test_stage_b_features_from_the_exported_encoder_match_the_trained_model(
    stage_a: dict, small_cohort: Path, ray_session: None
) -> None:
    from stence.train.features import extract_features

    export = Path(stage_a["checkpoint"]).parent
    cfg = apply_overrides(stage_a["cfg"], {"feature.frame_checkpoint": str(export / "frame_encoder.pt")})
    assert not trains_frame_encoder(cfg)  # with the exported weights, stage B and A reuse frozen features
    store = extract_features(cfg, progress=False)
    assert store.meta["weights"] != "random-init"
    cohort = Cohort.open(small_cohort)
    rows = cohort.views_of_study[cohort.studies["study_id"].iloc[0]]
    model = load_stage_a_export(export, stage_a["cfg"].feature.frame_encoder)
    frames = torch.from_numpy(np.asarray(cohort.frame_cache[rows, 0], np.float32))[None]
    with torch.no_grad():
        feats = model.encode(frames, torch.ones(1, len(rows), dtype=torch.bool))[0].numpy()  # (V, P, F)
    np.testing.assert_allclose(store.get(rows, 0), feats, atol=5e-3, rtol=5e-3)  # float16 cache


# ---------------------------------------------------------------------------------------------------
# the demo-size check


@pytest.mark.slow
@pytest.mark.ray
def test_demo_cohort_stage_a(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The default demo cohort (120 patients: 72 training studies, split as `make demo` splits it), the
    demo's stage-A settings (150 epochs, about 1.5 minutes on one CPU core).

    Measured (train.seed 0, 1, 2; the exported epoch is the best mean of patient, artery and segment AUROC:
    epochs 59-131): val patient AUROC 0.948, 0.985, 0.985 (the acceptance item: >= 0.9 on validation);
    the same exports on the demo test split 0.78-0.81 and on all 300 studies of another synthetic cohort
    (seed 7) 0.87-0.88, RCA 0.97-0.99, LCA 0.82-0.86. The held-out figure is the honest one: 70 % lesions are
    told from 50 % ones only weakly at 64 px (mean patient probability 0.25-0.49 vs 0.07-0.28).
    """
    from stence.data.ingest import ingest
    from stence.data.synth import SynthConfig, write_cohort
    from stence.pipelines.angio import run_angio

    write_cohort(tmp_path / "raw", SynthConfig.preset("demo", echonext=0))  # corrupt files change nothing
    monkeypatch.setenv("STENCE_SALT", "demo-site-secret-change-me")  # scripts/demo.sh's: the salt decides the split
    ingest(tmp_path / "raw", tmp_path / "cohort", Config(), processes=2)
    cfg = _stage_a_cfg(tmp_path / "cohort", tmp_path / "storage", **{"optim.epochs": 150})
    out = run_angio(cfg)
    assert out["metrics"]["val/auroc_patient"] >= 0.9  # the acceptance item, on the exported epoch
    assert out["metrics"]["epoch"] > 40  # ... a trained one, not an early lucky one
    export = Path(out["checkpoint"]).parent
    y, p = _predict(export, tmp_path / "cohort", ("val", "test"))
    assert auroc(y[:, 0], p[:, 0]) > 0.8  # val and test together: 48 patients
    assert np.mean([auroc(y[:, i], p[:, i]) for i in (1, 2)]) > 0.85  # RCA and LCA
    assert auroc(y[:, 1], p[:, 1]) > 0.85  # RCA lesions are found best (0.89-0.99 seen; 48 studies)
