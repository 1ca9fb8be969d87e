"""Synthetic ("pseudo") anomalies pasted into normal images, with exact masks: self-supervised validation
and denoising training need defects when the user has none.

Four families, so that no single shape is rewarded:

* ``cutpaste``: a rotated, rescaled rectangle cut from another normal image (CutPaste, Li et al. 2021);
* ``perlin``: a Perlin-noise region blended with a foreign texture (DRAEM, Zavrtanik et al. 2021);
* ``blob``: a soft ellipse shifted in intensity (gray) or colour (RGB);
* ``scratch``: a thin dark or bright polyline.

Images are CHW float32 in [0, 1]. As in ``synth``, a pixel belongs to the mask when some channel changed by
more than ``MASK_TOL``; smaller changes are reverted, so ``mask == (abs(out - img) > 0).any(0)`` holds.
Everything is drawn from the ``numpy.random.Generator`` passed in: same generator state, same anomaly.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np

from imganom.data.synth import polyline_alpha, random_walk

FAMILIES = ("cutpaste", "perlin", "blob", "scratch")
MASK_TOL = 0.02
MIN_CONTRAST = 0.06  # mean absolute change inside the mask; weaker draws are redrawn (invisible defects)
_TRIES = 8


@dataclass
class PseudoSample:
    """One pseudo-anomalous image (CHW float32), its exact mask (HW bool), the family and the source index."""

    image: np.ndarray
    mask: np.ndarray
    family: str
    source: int


def _finish(img: np.ndarray, out: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Clip, then keep only changes above ``MASK_TOL`` (the rest reverts to ``img``): (image, mask)."""
    out = np.clip(out, 0.0, 1.0).astype(np.float32)
    mask = (np.abs(out - img) > MASK_TOL).any(0)
    return np.where(mask[None], out, img).astype(np.float32), mask


def perlin_noise(rng: np.random.Generator, h: int, w: int, res: tuple[int, int]) -> np.ndarray:
    """2-D gradient (Perlin) noise of shape (h, w), roughly in [-0.7, 0.7], with ``res`` lattice cells."""
    ry, rx = res
    ang = rng.uniform(0, 2 * np.pi, (ry + 1, rx + 1))
    grad = np.stack([np.cos(ang), np.sin(ang)], -1)
    ys, xs = np.linspace(0, ry, h, endpoint=False), np.linspace(0, rx, w, endpoint=False)
    yi, xi = ys.astype(int), xs.astype(int)
    fy, fx = (ys - yi)[:, None], (xs - xi)[None, :]

    def corner(dy: int, dx: int) -> np.ndarray:
        g = grad[(yi + dy)[:, None], (xi + dx)[None, :]]
        return g[..., 0] * (fy - dy) + g[..., 1] * (fx - dx)

    def fade(t: np.ndarray) -> np.ndarray:
        return t * t * t * (t * (t * 6 - 15) + 10)

    uy, ux = fade(fy), fade(fx)
    top = corner(0, 0) * (1 - ux) + corner(0, 1) * ux
    bottom = corner(1, 0) * (1 - ux) + corner(1, 1) * ux
    return (top * (1 - uy) + bottom * uy).astype(np.float32)


def foreign_texture(rng: np.random.Generator, c: int, h: int, w: int) -> np.ndarray:
    """A texture unlike any particular normal image: stripes at a random frequency/angle plus smooth noise,
    with a random level, contrast and (RGB) tint. (c, h, w) float32 in [0, 1]."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    theta, period = rng.uniform(0, np.pi), rng.uniform(3, max(4.0, min(h, w) / 4))
    stripes = np.sin(2 * np.pi * (xx * np.cos(theta) + yy * np.sin(theta)) / period)
    res = int(rng.integers(2, 9))
    noise = perlin_noise(rng, h, w, (res, res)) / 0.7
    mix = rng.uniform(0.2, 0.8)
    t = mix * stripes + (1 - mix) * noise
    level, contrast = rng.uniform(0.15, 0.85), rng.uniform(0.1, 0.3)
    tint = rng.uniform(0.6, 1.4, (c, 1, 1)) if c > 1 else np.ones((1, 1, 1))
    return np.clip((level + contrast * t)[None] * tint, 0, 1).astype(np.float32)


def _rotated_rect(center: np.ndarray, size: tuple[float, float], angle: float, h: int, w: int) -> np.ndarray:
    box = cv2.boxPoints(((float(center[0]), float(center[1])), size, angle))
    m = np.zeros((h, w), np.uint8)
    cv2.fillPoly(m, [np.round(box).astype(np.int32)], 1)
    return m.astype(bool)


def _cutpaste(img: np.ndarray, rng: np.random.Generator, donor: np.ndarray) -> np.ndarray:
    c, h, w = img.shape
    s = min(h, w)
    pw, ph = rng.uniform(0.08, 0.3) * s, rng.uniform(0.08, 0.3) * s
    angle, scale = rng.uniform(-60, 60), rng.uniform(0.7, 1.4)
    src = np.array([rng.uniform(pw, w - pw), rng.uniform(ph, h - ph)])
    dst = np.array([rng.uniform(0.15 * w, 0.85 * w), rng.uniform(0.15 * h, 0.85 * h)])
    m = cv2.getRotationMatrix2D((float(src[0]), float(src[1])), angle, scale)
    m[:, 2] += dst - src  # rotate/scale about the source centre, then move it onto the destination
    warped = cv2.warpAffine(
        np.ascontiguousarray(donor.transpose(1, 2, 0)), m, (w, h), flags=cv2.INTER_LINEAR,
        borderMode=cv2.BORDER_REFLECT_101,
    )  # fmt: skip
    warped = warped.reshape(h, w, c).transpose(2, 0, 1)
    region = _rotated_rect(dst, (pw * scale, ph * scale), -angle, h, w)
    return np.where(region[None], warped, img)


def _perlin(img: np.ndarray, rng: np.random.Generator, donor: np.ndarray) -> np.ndarray:
    c, h, w = img.shape
    for _ in range(_TRIES):
        k = 2 ** int(rng.integers(1, 5))
        region = perlin_noise(rng, h, w, (k, k)) > rng.uniform(0.3, 0.5)
        if 0.005 <= region.mean() <= 0.35:
            break
    tex = foreign_texture(rng, c, h, w)
    if rng.random() < 0.3:  # sometimes the foreign texture is another normal image, turned and inverted
        turned = np.rot90(1.0 - donor, int(rng.integers(1, 4)), axes=(1, 2)).transpose(1, 2, 0)
        tex = cv2.resize(np.ascontiguousarray(turned), (w, h)).reshape(h, w, c).transpose(2, 0, 1)
    keep = rng.uniform(0.0, 0.6)  # DRAEM's opacity: how much of the original shows through
    return np.where(region[None], keep * img + (1 - keep) * tex, img)


def _blob(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    c, h, w = img.shape
    s = min(h, w)
    alpha = np.zeros((h, w), np.float32)
    centre = (int(rng.uniform(0.1 * w, 0.9 * w)), int(rng.uniform(0.1 * h, 0.9 * h)))
    axes = (max(2, int(rng.uniform(0.03, 0.15) * s)), max(2, int(rng.uniform(0.03, 0.15) * s)))
    cv2.ellipse(alpha, centre, axes, float(rng.uniform(0, 180)), 0, 360, 1.0, -1)
    alpha = cv2.GaussianBlur(alpha, (0, 0), max(0.8, 0.25 * min(axes)))
    alpha = np.clip(alpha / max(float(alpha.max()), 1e-6), 0, 1)
    if c == 1:
        shift = np.array([rng.choice([-1, 1]) * rng.uniform(0.15, 0.4)], np.float32)
    else:  # a colour change: a random direction, partly away from gray
        d = rng.normal(0, 1, c)
        shift = (d / np.linalg.norm(d) * rng.uniform(0.2, 0.45)).astype(np.float32)
    return img + alpha[None] * shift[:, None, None]


def _scratch(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    c, h, w = img.shape
    s = min(h, w)
    start = np.array([rng.uniform(0.15 * w, 0.85 * w), rng.uniform(0.15 * h, 0.85 * h)])
    heading, length = rng.uniform(0, 2 * np.pi), rng.uniform(0.2, 0.6) * s
    line = random_walk(rng, start, heading, length, rng.uniform(0.0, 0.15))
    alpha = polyline_alpha(h, w, [line], int(rng.integers(1, 3)))
    level = img.mean()
    target = rng.uniform(0.0, 0.15) if level > 0.5 or rng.random() < 0.5 else rng.uniform(0.85, 1.0)
    return img * (1 - alpha[None]) + np.float32(target) * alpha[None]


def add_pseudo_anomaly(
    img: np.ndarray, rng: np.random.Generator, family: str, donor: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Paste one anomaly of ``family`` into ``img`` (CHW float32 in [0, 1]): (image, exact HW bool mask).

    ``donor`` (another normal image of the same shape) feeds ``cutpaste`` and some ``perlin`` textures; the
    image itself, flipped, when absent. Draws too faint to see (mean change in the mask under
    ``MIN_CONTRAST``) are redrawn a few times; the mask is never empty unless every draw was invisible."""
    if family not in FAMILIES:
        raise ValueError(f"unknown pseudo-anomaly family {family!r}; expected one of {FAMILIES}")
    img = np.ascontiguousarray(img, dtype=np.float32)
    if img.ndim != 3:
        raise ValueError(f"image must be CHW, got shape {img.shape}")
    donor = img[:, ::-1, ::-1] if donor is None else np.asarray(donor, np.float32)
    if donor.shape != img.shape:
        raise ValueError(f"donor shape {donor.shape} differs from image shape {img.shape}")
    best: tuple[np.ndarray, np.ndarray] | None = None
    best_contrast = -1.0
    for _ in range(_TRIES):
        if family == "cutpaste":
            raw = _cutpaste(img, rng, donor)
        elif family == "perlin":
            raw = _perlin(img, rng, donor)
        elif family == "blob":
            raw = _blob(img, rng)
        else:
            raw = _scratch(img, rng)
        out, mask = _finish(img, raw)
        contrast = float(np.abs(out - img).max(0)[mask].mean()) if mask.any() else 0.0
        if contrast > best_contrast:
            best, best_contrast = (out, mask), contrast
        if contrast >= MIN_CONTRAST:
            break
    assert best is not None
    return best


def pseudo_anomalies(
    images: Sequence[np.ndarray], seed: int = 0, families: Sequence[str] = FAMILIES
) -> list[PseudoSample]:
    """One anomaly of every family in each image: image ``i`` x family ``k`` is drawn from
    ``default_rng([seed, i, k])`` with image ``i + 1`` (cyclically) as the donor."""
    out = []
    n = len(images)
    for i, img in enumerate(images):
        donor = images[(i + 1) % n] if n > 1 else None
        for k, fam in enumerate(families):
            rng = np.random.default_rng([seed, i, FAMILIES.index(fam), k])
            im, m = add_pseudo_anomaly(img, rng, fam, donor)
            out.append(PseudoSample(im, m, fam, i))
    return out
