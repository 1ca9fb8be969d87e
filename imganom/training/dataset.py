"""Training data: normal images decoded once into memory, model-sized views, albumentations at train time.

Augmentation randomness is re-seeded per (seed, epoch, index), so results do not depend on the number of
DataLoader workers and a resumed run sees exactly the samples an uninterrupted one would.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from imganom.config import AugmentConfig, Config, IntensityConfig
from imganom.data.preprocess import prepare
from imganom.data.pseudo import FAMILIES, add_pseudo_anomaly
from imganom.data.readers import ImageReadError, read_image, read_options
from imganom.ops.foreground import empty_slices, foreground_fraction

log = logging.getLogger(__name__)


def build_augment(cfg: AugmentConfig, seed: int = 0):
    """An albumentations pipeline for HWC float32 images in [0, 1] (None when everything is off)."""
    import albumentations as A
    import cv2

    ops = []
    if cfg.hflip:
        ops.append(A.HorizontalFlip(p=cfg.hflip))
    if cfg.vflip:
        ops.append(A.VerticalFlip(p=cfg.vflip))
    if cfg.affine_p and (cfg.shift or cfg.rotate):
        ops.append(
            A.Affine(
                translate_percent=(-cfg.shift, cfg.shift),
                rotate=(-cfg.rotate, cfg.rotate),
                border_mode=cv2.BORDER_REFLECT_101,
                p=cfg.affine_p,
            )
        )
    if cfg.brightness_contrast_p and (cfg.brightness or cfg.contrast):
        ops.append(
            A.RandomBrightnessContrast(
                brightness_limit=cfg.brightness, contrast_limit=cfg.contrast, p=cfg.brightness_contrast_p
            )
        )
    if cfg.noise_p and cfg.noise_std:
        ops.append(A.GaussNoise(std_range=(0.0, cfg.noise_std), p=cfg.noise_p))
    return A.Compose(ops, seed=seed) if ops else None


def fingerprint(ids: Sequence[str]) -> dict:
    """Count and hash of the training item ids (stored in the model file)."""
    h = hashlib.sha256("\n".join(sorted(ids)).encode()).hexdigest()[:16]
    return {"count": len(ids), "ids_sha256": h}


class NormalImages(Dataset):
    """Decoded normal images; ``__getitem__`` returns a (C, h, w) float32 tensor in [0, 1].

    stretch/letterbox: the whole image resized once. tile: native resolution, one random model-sized crop
    per draw (train) or the top-left-first tile grid centre crop (eval).
    Denoising training (``train.denoise`` > 0, train only): ``__getitem__`` returns ``(input, target)``, the
    input being the target with, for that fraction of draws, a synthetic anomaly (``data.pseudo``) pasted in.
    """

    def __init__(self, paths: Sequence[Path], ids: Sequence[str], cfg: Config, train: bool):
        self.cfg, self.train, self.epoch = cfg, train, 0
        pp = cfg.preprocess
        self.items: list[np.ndarray] = []
        self.ids: list[str] = []
        self.skipped: list[str] = []
        read: list[str] = []
        for p, i in zip(paths, ids):
            try:
                chw, _ = read_image(p, **read_options(pp))
            except ImageReadError as e:
                log.warning("skipping training image: %s", e)
                self.skipped.append(str(e))
                continue
            if pp.resize != "tile":
                chw = prepare(chw, pp)[0][0]
            self.items.append(np.ascontiguousarray(chw))
            self.ids.append(i)
            read.append(str(p))
        if cfg.train.min_foreground and self.items:
            self._drop_empty(read)
        if not self.items:
            raise ValueError(
                "no readable training images" + (f" (first error: {self.skipped[0]})" if self.skipped else "")
            )
        self.augment = build_augment(cfg.augment, cfg.train.seed) if train else None
        self.denoise = cfg.train.denoise if train else 0.0

    def _drop_empty(self, paths: list[str]) -> None:
        """``train.min_foreground``: drop (and note in ``skipped``) empty or near-empty slices, judged on
        their absolute (dtype) intensities against the whole set (``ops.foreground.empty_slices``)."""
        pp = self.cfg.preprocess.model_copy(update={"resize": "stretch"})
        opts = read_options(pp.model_copy(update={"intensity": IntensityConfig(mode="dtype")}))
        views = torch.from_numpy(np.concatenate([prepare(read_image(p, **opts)[0], pp)[0] for p in paths]))
        empty, floor = empty_slices(views, self.cfg.train.min_foreground)
        fracs = foreground_fraction(views, floor)
        for k in sorted(np.flatnonzero(empty.numpy()), reverse=True):
            self.skipped.append(f"{paths[k]}: foreground {float(fracs[k]):.3f} below train.min_foreground")
            del self.items[k], self.ids[k]

    def __len__(self) -> int:
        return len(self.items)

    def _rng(self, idx: int) -> np.random.Generator:
        return np.random.default_rng((self.cfg.train.seed, self.epoch, idx, int(self.train)))

    def _view(self, chw: np.ndarray, idx: int, centre: bool = False) -> np.ndarray:
        """The model-sized view; tiles: a random crop (train) or the centre crop (eval, or ``centre``)."""
        if self.cfg.preprocess.resize != "tile":
            return chw
        h, w = self.cfg.preprocess.size
        H, W = chw.shape[1:]
        if H < h or W < w:
            return prepare(chw, self.cfg.preprocess.model_copy(update={"resize": "stretch"}))[0][0]
        if self.train and not centre:
            rng = self._rng(idx)
            y, x = int(rng.integers(0, H - h + 1)), int(rng.integers(0, W - w + 1))
        else:
            y, x = (H - h) // 2, (W - w) // 2
        return chw[:, y : y + h, x : x + w]

    def views(self) -> torch.Tensor:
        """Every image's un-augmented model view (the eval crop for tiles): (N, C, h, w) float32."""
        return torch.from_numpy(
            np.stack(
                [np.asarray(self._view(c, i, centre=True), np.float32) for i, c in enumerate(self.items)]
            )
        )

    def __getitem__(self, idx: int) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        chw = self._view(self.items[idx], idx)
        if self.augment is not None:
            self.augment.set_random_seed(int(self._rng(idx).integers(0, 2**31 - 1)))
            hwc = self.augment(image=np.ascontiguousarray(chw.transpose(1, 2, 0)))["image"]
            chw = np.clip(hwc, 0.0, 1.0).transpose(2, 0, 1) if hwc.ndim == 3 else np.clip(hwc, 0.0, 1.0)[None]
        target = torch.from_numpy(np.ascontiguousarray(chw, dtype=np.float32))
        if not self.denoise:
            return target
        rng = np.random.default_rng((self.cfg.train.seed, self.epoch, idx, 2))  # not the augmentation stream
        if rng.random() >= self.denoise:
            return target, target
        j = (idx + 1 + int(rng.integers(0, max(1, len(self) - 1)))) % len(self)
        donor = self._view(self.items[j], j)
        noisy, _ = add_pseudo_anomaly(
            target.numpy(), rng, FAMILIES[int(rng.integers(0, len(FAMILIES)))], donor
        )
        return torch.from_numpy(noisy), target
