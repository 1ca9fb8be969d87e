"""``postprocess.roi: auto`` end to end on generated head-like phantoms (8-bit RGB PNGs): training skips
empty slices, calibration measures statistics and pixel thresholds on tissue only, and background never
yields a region or a score, even at a pixel threshold every tissue pixel passes."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from imganom.config import load_config
from imganom.data.preprocess import prepare
from imganom.formats.modelfile import load_model, save_model
from imganom.inference import Inspector
from imganom.ops.foreground import foreground_mask
from imganom.training.trainer import train
from imganom.workflows.calibrate import calibrate, map_statistics

SIZE = 48


def _phantom(seed: int, lesion: bool = False) -> np.ndarray:
    """HxWx3 uint8: a textured bright ellipse (jittered) on dark noisy air; optionally a bright blob."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:SIZE, :SIZE] / SIZE
    cy, cx = 0.5 + rng.uniform(-0.04, 0.04), 0.5 + rng.uniform(-0.04, 0.04)
    inside = ((yy - cy) / 0.38) ** 2 + ((xx - cx) / 0.3) ** 2 < 1
    img = np.where(inside, 110 + 15 * np.sin(yy * 40 + seed), 4) + rng.normal(0, 3, (SIZE, SIZE))
    if lesion:
        img[((yy - cy) / 0.1) ** 2 + ((xx - cx) / 0.1) ** 2 < 1] = 240
    chans = [img * f for f in (0.8, 1.0, 0.9)]
    return np.clip(np.stack(chans, -1), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[Path]]:
    root = tmp_path_factory.mktemp("roi_auto")
    (root / "train").mkdir()
    normals = []
    for k in range(16):
        normals.append(root / "train" / f"n{k:02d}.png")
        cv2.imwrite(str(normals[-1]), _phantom(k))
    empty = []
    for k in range(3):  # empty slices (air only): skipped by train.min_foreground
        empty.append(root / "train" / f"z_empty{k}.png")
        cv2.imwrite(str(empty[-1]), np.clip(np.random.default_rng(k).normal(4, 3, (SIZE, SIZE, 3)), 0, 255)
                    .astype(np.uint8))  # fmt: skip
    lesion = root / "lesion.png"
    cv2.imwrite(str(lesion), _phantom(99, lesion=True))
    return {"normals": normals, "empty": empty, "lesion": [lesion], "root": [root]}


@pytest.fixture(scope="module")
def roi_model(phantoms: dict[str, list[Path]], tmp_path_factory: pytest.TempPathFactory) -> Path:
    cfg = load_config("medical-mri", {
        "preprocess": {"size": [SIZE, SIZE]}, "model": {"depth": 3, "base_channels": 8, "latent_dim": 16},
        "train": {"epochs": 2, "self_check": False, "val_fraction": 0.2},
        "map": {"scales": [3.0]},
    })  # fmt: skip
    assert cfg.postprocess.roi == "auto" and cfg.train.min_foreground > 0
    res = train(cfg, phantoms["root"][0] / "train", tmp_path_factory.mktemp("run"), device="cpu")
    skipped = [s for s in load_model(res.model_path)[1].training["skipped"] if "min_foreground" in s]
    assert len(skipped) == 3 and all("z_empty" in s for s in skipped)  # the empty slices, nothing else
    return res.model_path


def _fg(insp: Inspector, paths: list[Path]) -> torch.Tensor:
    views = np.concatenate([prepare(insp.load_input(p)[0], insp.cfg.preprocess)[0] for p in paths])
    return foreground_mask(torch.from_numpy(views), insp.cfg.postprocess.roi_erode)


def test_statistics_and_thresholds_come_from_tissue_only(roi_model: Path, phantoms: dict) -> None:
    insp = Inspector.load(roi_model, device="cpu")
    normals = phantoms["normals"]
    stats = map_statistics(insp, normals[:8])
    fg = _fg(insp, normals[:8])
    never = ~fg.any(0)
    assert bool(never.any()) and bool((stats["map_mean"][never] == 0).all())
    views = np.concatenate([prepare(insp.load_input(p)[0], insp.cfg.preprocess)[0] for p in normals[:8]])
    raw = insp.raw_maps(torch.from_numpy(views)).double()
    px = fg.all(0)  # tissue in every view: the per-pixel mean is the plain mean there
    torch.testing.assert_close(stats["map_mean"][px].double(), raw.mean(0)[px], rtol=1e-4, atol=1e-6)
    cal, _ = calibrate(insp, normals[8:], stats_paths=normals[:8])
    calibrated = insp.with_calibration(cal, stats)
    tissue = np.concatenate([r.anomaly_map[r.anomaly_map != 0] for r in calibrated.predict(normals[8:])])
    assert np.mean(tissue > cal["pixel_threshold"]) <= 1 - cal["pixel_quantile"] + 1e-3
    assert cal["pixel_stats"]["n_sampled"] == tissue.size  # background pixels never entered the sample


def test_background_never_yields_a_region(roi_model: Path, phantoms: dict) -> None:
    auto = Inspector.load(roi_model, device="cpu", pixel_threshold=1e-9, image_threshold=0.0)
    model, meta, stats = load_model(roi_model)
    off = meta.cfg.model_copy(update={"postprocess": meta.cfg.postprocess.model_copy(update={"roi": "none"})})
    plain_path = roi_model.with_name("plain.safetensors")
    save_model(plain_path, model, off, calibration=meta.calibration, stats=stats)
    plain = Inspector.load(plain_path, device="cpu", pixel_threshold=1e-9, image_threshold=0.0)
    paths = phantoms["normals"][:4] + phantoms["lesion"]
    for p, a, b in zip(paths, auto.predict(paths), plain.predict(paths)):
        chw = auto.load_input(p)[0]
        tissue = cv2.dilate((chw.mean(0) > 0.1).astype(np.uint8), np.ones((5, 5), np.uint8)) > 0
        assert a.mask.any() and not a.mask[~tissue].any(), p.name  # everything passes, but only tissue
        assert not a.anomaly_map[~tissue].any()
        assert all(tissue[int(r.centroid[1]), int(r.centroid[0])] for r in a.regions)
        assert b.mask[~tissue].any()  # the same model without the ROI: air passes too
