"""Angiography feature extraction as a Ray Data job: frame encoder over every view, cached per cohort.

The cache key covers everything that changes the features (cohort fingerprint, frame-encoder name and
weights, image size, feature width, variants, seed): a stale cache is never used, a new key is built.
Extraction is resumable: finished rows are marked in `done.npy` as batches arrive, and a restarted job
encodes only what is missing. Variant 0 is the unaugmented view (validation always uses it); variants
1..K-1 apply seeded intensity/geometry augmentations for training.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from stence.config import Config, from_dict, to_dict
from stence.data.cohort_io import Cohort
from stence.data.feature_store import FeatureStore
from stence.data.frame_augment import augment_frames
from stence.models.frame_encoder import load_dinov2_checkpoint, prepare_frames
from stence.models.registry import create_frame_encoder
from stence.outputs import claim_output
from stence.train.driver import ensure_ray


def _weights_id(path: str) -> str:
    if not path:
        return "random-init"
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def feature_key(cohort: Cohort, cfg: Config) -> str:
    """Hash of everything the features depend on."""
    ingredients = {
        "cohort": cohort.fingerprint,
        "feature": to_dict(cfg.feature),
        "weights": _weights_id(cfg.feature.frame_checkpoint),
        "frame_size": cohort.meta["data_config"]["frame_size"],
    }
    ingredients["feature"].pop("batch_size", None)  # execution details do not change the features
    ingredients["feature"].pop("actors", None)
    # stage A's training options (cfg.stage_a) are not in `feature`: the features do not depend on them
    return hashlib.sha256(json.dumps(ingredients, sort_keys=True).encode()).hexdigest()[:12]


FEATURES_KIND = "features"  # output kind in the ownership marker (stence/outputs.py)


def features_dir(cohort: Cohort, cfg: Config) -> Path:
    return cohort.root / "features" / feature_key(cohort, cfg)


class FrameEncoderActor:
    """Ray Data actor: holds one frame encoder, encodes batches of (view row, variant)."""

    def __init__(self, cohort_root: str, cfg_dict: dict[str, Any]):
        self.cfg = from_dict(cfg_dict)
        f = self.cfg.feature
        torch.manual_seed(f.seed)
        self.encoder = create_frame_encoder(f.frame_encoder, feature_dim=f.feature_dim, img_size=f.image_size)
        if f.frame_checkpoint:
            load_dinov2_checkpoint(self.encoder, f.frame_checkpoint)
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.encoder.eval().to(self.device)
        self.prepare = prepare_frames
        self.cohort = Cohort.open(cohort_root)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows, variants = batch["row"], batch["variant"]
        frames = np.stack([np.asarray(self.cohort.frame_cache[r, 0], np.float32) for r in rows])  # (N, S, S)
        for j, (r, v) in enumerate(zip(rows, variants, strict=True)):
            if v > 0:
                rng = np.random.default_rng([self.cfg.feature.seed, int(r), int(v)])
                frames[j] = augment_frames(frames[j : j + 1], rng)[0]
        x = self.prepare(torch.from_numpy(frames), self.cfg.feature.image_size).to(self.device)  # (N, 3, H, W)
        with torch.inference_mode(), torch.autocast(self.device, dtype=torch.bfloat16, enabled=self.device == "cuda"):
            feats = self.encoder(x).float()  # (N, P, F)
        return {"row": rows, "variant": variants, "feats": feats.cpu().numpy().astype(np.float16)}


def extract_features(cfg: Config, cohort_root: str | Path | None = None, progress: bool = True) -> FeatureStore:
    """Encode every view of the cohort (all variants) into the feature cache; resume a partial one."""
    import ray  # ray (~0.5 s to import): only to extract; feature_key and features_dir do not need it

    cohort = Cohort.open(cohort_root or cfg.data.cohort)
    out = features_dir(cohort, cfg)
    if (out / "meta.json").exists():
        return FeatureStore.open(out)
    # ours (a partial cache resumes) or new; a folder there that stence did not write is refused
    claim_output(out, FEATURES_KIND, overwrite=True)
    n_views, n_var = len(cohort.views), cfg.feature.variants
    probe = FrameEncoderActor(str(cohort.root), to_dict(cfg))({"row": np.array([0]), "variant": np.array([0])})
    p, f = probe["feats"].shape[1:]
    feats_path, done_path = out / "feats.npy", out / "done.npy"
    if feats_path.exists() and done_path.exists():
        feats = np.load(feats_path, mmap_mode="r+")
        done = np.load(done_path)
    else:
        feats = np.lib.format.open_memmap(feats_path, mode="w+", dtype=np.float16, shape=(n_views, n_var, p, f))
        done = np.zeros((n_views, n_var), dtype=bool)
    todo = [{"row": r, "variant": v} for r in range(n_views) for v in range(n_var) if not done[r, v]]
    if todo:
        ensure_ray()
        use_gpu = bool(ray.cluster_resources().get("GPU", 0))
        ds = ray.data.from_items(todo).map_batches(
            FrameEncoderActor,
            fn_constructor_args=(str(cohort.root), to_dict(cfg)),
            batch_size=cfg.feature.batch_size,
            compute=ray.data.ActorPoolStrategy(size=cfg.feature.actors),
            num_gpus=1 if use_gpu else 0,
            num_cpus=1,
            batch_format="numpy",
        )
        bar = tqdm(total=len(todo), desc="encode views", unit="view", disable=not progress, mininterval=0.5)
        for i, b in enumerate(ds.iter_batches(batch_size=None, batch_format="numpy")):
            feats[b["row"], b["variant"]] = b["feats"]
            done[b["row"], b["variant"]] = True
            bar.update(len(b["row"]))
            if i % 16 == 0:  # persist progress so an interrupted job resumes
                feats.flush()
                np.save(done_path, done)
        bar.close()
    feats.flush()
    np.save(done_path, done)
    if not done.all():
        raise RuntimeError(f"feature extraction incomplete: {int((~done).sum())} (view, variant) pairs missing")
    meta = {"key": out.name, "shape": [n_views, n_var, int(p), int(f)], "cohort": cohort.fingerprint,
            "feature": to_dict(cfg.feature), "weights": _weights_id(cfg.feature.frame_checkpoint)}
    tmp = out / "meta.json.tmp"
    tmp.write_text(json.dumps(meta, indent=2))
    os.replace(tmp, out / "meta.json")  # written last: its presence marks a complete cache
    return FeatureStore.open(out)
