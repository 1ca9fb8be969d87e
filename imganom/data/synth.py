"""Deterministic synthetic inspection data: textured "normal" parts and five kinds of visible defects.

Used by tests, ``imganom demo`` and benchmarks. Design rules:

* Normal images are *learnable* by a small conv VAE: smooth or periodic textures with moderate, structured
  variation (texture std ~0.03-0.09 on a [0, 1] scale), a little sensor noise, and per-image jitter in phase,
  brightness, contrast and orientation (a few degrees) -- one product appearance per texture family.
* Defects are *visible*: their core differs from the texture by ~0.3-0.5, several times the texture's local
  variation, so a reconstruction-error detector can find them.
* Masks are exact: a defect's mask is the set of pixels it changed by more than ``MASK_TOL``; changes below
  that are reverted, so ``mask == (defective != clean).any(-1)`` holds in memory.
* Everything is drawn from a ``numpy.random.Generator``; ``make_dataset`` derives one generator per image
  from ``(seed, split, index)``, so an image never depends on how many images other splits hold.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np

TEXTURES = ("grain", "stripes", "weave", "gradient")
DEFECTS = ("scratch", "spot", "crack", "hole", "contamination")
FORMATS = ("png", "tiff", "jpg")
MASK_TOL = 0.02  # a pixel belongs to the mask when some channel changed by more than this

# RGB tint per family (gray stays in ~[0.2, 0.7], so tinted values stay well inside [0, 1]).
_TINT = {
    "grain": (1.04, 1.0, 0.9),  # warm brushed metal
    "stripes": (0.88, 1.0, 1.1),  # bluish machined surface
    "weave": (1.1, 0.96, 0.76),  # fabric
    "gradient": (0.96, 1.0, 1.06),  # coated panel under uneven light
}
_CONTAMINATION_COLORS = np.array(
    [(0.62, 0.27, 0.06), (0.15, 0.5, 0.15), (0.08, 0.08, 0.1), (0.12, 0.22, 0.65), (0.95, 0.9, 0.55)],
    dtype=np.float32,
)
SPLIT_IDS = {"train": 0, "test_good": 1, "test_defect": 2}  # image i of a split: default_rng([seed, id, i])


def _hw(size: tuple[int, int] | int) -> tuple[int, int]:
    h, w = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    if min(h, w) < 16:
        raise ValueError(f"size {(h, w)} too small: each side must be >= 16")
    return h, w


def _blur(a: np.ndarray, sx: float, sy: float | None = None) -> np.ndarray:
    return cv2.GaussianBlur(
        a, (0, 0), sigmaX=sx, sigmaY=sx if sy is None else sy, borderType=cv2.BORDER_REFLECT
    )


def _smooth_noise(rng: np.random.Generator, h: int, w: int, sigma: float) -> np.ndarray:
    """Gaussian-blurred white noise rescaled to unit std: a random low-frequency field."""
    f = _blur(rng.standard_normal((h, w)).astype(np.float32), sigma)
    return (f - f.mean()) / (f.std() + 1e-8)


def _rotated_coords(
    h: int, w: int, angle: float, shift: tuple[float, float]
) -> tuple[np.ndarray, np.ndarray]:
    """Pixel coordinates (u along ``angle`` radians, v across) about the image centre, plus a shift."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    xx -= (w - 1) / 2
    yy -= (h - 1) / 2
    c, s = np.float32(np.cos(angle)), np.float32(np.sin(angle))
    return xx * c + yy * s + shift[0], -xx * s + yy * c + shift[1]


def _grain(rng: np.random.Generator, h: int, w: int, angle: float) -> np.ndarray:
    """Brushed-metal grain: noise stretched along one direction (rotated by ``angle``) over soft shading."""
    s = min(h, w)
    d = int(np.ceil(np.hypot(h, w))) + 8
    streaks = _smooth_noise(rng, d, d, 1.0)
    streaks = _blur(streaks, s / 6, max(0.8, s / 48))
    streaks /= streaks.std() + 1e-8
    m = cv2.getRotationMatrix2D(((d - 1) / 2, (d - 1) / 2), float(np.degrees(angle)), 1.0)
    m[:, 2] += ((w - 1) / 2 - (d - 1) / 2, (h - 1) / 2 - (d - 1) / 2)
    streaks = cv2.warpAffine(streaks, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
    return 0.46 + 0.055 * streaks + 0.025 * _smooth_noise(rng, h, w, s / 4)


def _stripes(rng: np.random.Generator, h: int, w: int, angle: float) -> np.ndarray:
    """Machined stripes: a sinusoid of period ~1/8 of the side (>= 6 px) with random phase."""
    p = max(6.0, min(h, w) / 8) * rng.uniform(0.97, 1.03)
    u, _ = _rotated_coords(h, w, angle + np.pi / 2, (rng.uniform(0, p), 0.0))
    return 0.46 + 0.09 * np.sin(2 * np.pi * u / p) + 0.02 * _smooth_noise(rng, h, w, min(h, w) / 4)


def _weave(rng: np.random.Generator, h: int, w: int, angle: float) -> np.ndarray:
    """Basket weave: cells of three threads, alternating horizontal/vertical, dipping at cell edges."""
    c = max(18.0, min(h, w) / 3)  # cell side
    u, v = _rotated_coords(h, w, angle, (rng.uniform(0, 2 * c), rng.uniform(0, 2 * c)))
    t = c / 3  # thread pitch
    parity = (np.floor(u / c) + np.floor(v / c)) % 2 == 0
    across = np.where(parity, 0.5 - 0.5 * np.cos(2 * np.pi * v / t), 0.5 - 0.5 * np.cos(2 * np.pi * u / t))
    along = np.where(parity, np.sin(np.pi * (u / c % 1)), np.sin(np.pi * (v / c % 1)))
    return 0.33 + 0.24 * across * (0.65 + 0.35 * along)


def _gradient(rng: np.random.Generator, h: int, w: int, angle: float) -> np.ndarray:
    """Coated panel under uneven light: a linear ramp, a vignette and faint low-frequency mottling."""
    s = min(h, w)
    u, v = _rotated_coords(h, w, angle + np.pi / 4, (0.0, 0.0))
    ramp = rng.uniform(0.2, 0.28) * u / np.hypot(h, w) * 2
    vignette = (u**2 + v**2) / (h * h + w * w) * 4
    return 0.5 + 0.5 * ramp - 0.08 * vignette + 0.02 * _smooth_noise(rng, h, w, s / 6)


_TEXTURE_FN = {"grain": _grain, "stripes": _stripes, "weave": _weave, "gradient": _gradient}


def normal_image(
    rng: np.random.Generator, size: tuple[int, int] | int, texture: str, channels: int = 1
) -> np.ndarray:
    """One defect-free image, float32 (H, W, C) in [0, 1].

    ``texture`` is one of ``TEXTURES`` (a single product appearance with per-image jitter) or ``"mixed"``
    (the family itself is drawn per image: a deliberately multi-modal normal class). ``channels`` is 1 (gray)
    or 3 (RGB, the gray texture tinted per family).
    """
    h, w = _hw(size)
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    if texture == "mixed":
        texture = TEXTURES[int(rng.integers(len(TEXTURES)))]
    if texture not in _TEXTURE_FN:
        raise ValueError(f"unknown texture {texture!r}; expected one of {TEXTURES + ('mixed',)}")
    angle = float(np.radians(rng.uniform(-4.0, 4.0)))
    g = _TEXTURE_FN[texture](rng, h, w, angle).astype(np.float32)
    mean = np.float32(g.mean())
    g = mean + (g - mean) * np.float32(rng.uniform(0.9, 1.1)) + np.float32(rng.uniform(-0.03, 0.03))
    g += 0.008 * rng.standard_normal((h, w)).astype(np.float32)  # sensor noise
    if channels == 1:
        img = g[..., None]
    else:
        tint = np.asarray(_TINT[texture], np.float32) + rng.uniform(-0.02, 0.02, 3).astype(np.float32)
        img = g[..., None] * tint
    return np.clip(img, 0.0, 1.0).astype(np.float32)


# --------------------------------------------------------------------------------------------- defects


def _center(rng: np.random.Generator, h: int, w: int, margin: float = 0.2) -> np.ndarray:
    return np.array([rng.uniform(margin * w, (1 - margin) * w), rng.uniform(margin * h, (1 - margin) * h)])


def polyline_alpha(h: int, w: int, lines: list[np.ndarray], thickness: int) -> np.ndarray:
    """Anti-aliased coverage in [0, 1] of polylines given as float (N, 2) x/y arrays (sub-pixel precise)."""
    canvas = np.zeros((h, w), np.uint8)
    pts = [np.round(p * 16).astype(np.int32).reshape(-1, 1, 2) for p in lines]
    cv2.polylines(canvas, pts, False, 255, thickness=thickness, lineType=cv2.LINE_AA, shift=4)
    return canvas.astype(np.float32) / 255


def random_walk(
    rng: np.random.Generator, start: np.ndarray, heading: float, length: float, wiggle: float
) -> np.ndarray:
    """Random-walk polyline: steps of ~2 px whose heading drifts by N(0, wiggle) per step."""
    n = max(2, int(length / 2))
    ang = heading + np.cumsum(rng.normal(0.0, wiggle, n))
    steps = 2.0 * np.stack([np.cos(ang), np.sin(ang)], 1)
    return np.vstack([start, start + np.cumsum(steps, 0)])


def _local_level(img: np.ndarray, xy: np.ndarray, r: int) -> float:
    x, y = int(xy[0]), int(xy[1])
    return float(img[max(0, y - r) : y + r + 1, max(0, x - r) : x + r + 1].mean())


def _gray_target(rng: np.random.Generator, img: np.ndarray, xy: np.ndarray, r: int) -> float:
    """A dark or bright level; bright only where the surroundings are dark enough to keep contrast high."""
    bright = rng.random() < 0.5 and _local_level(img, xy, r) < 0.55
    return rng.uniform(0.9, 0.97) if bright else rng.uniform(0.03, 0.1)


def _scratch(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    h, w = img.shape[:2]
    s = min(h, w)
    length = rng.uniform(0.2, 0.5) * s
    k = int(rng.integers(1, 4))  # segments
    ang = rng.uniform(0, np.pi) + np.cumsum(np.r_[0.0, rng.normal(0, 0.3, k - 1)])
    seg = length / k * np.stack([np.cos(ang), np.sin(ang)], 1)
    pts = np.vstack([np.zeros(2), np.cumsum(seg, 0)])
    pts += _center(rng, h, w) - pts.mean(0)
    alpha = polyline_alpha(h, w, [pts], int(rng.integers(1, 3)))  # AA thickness 1-2: ~1-3 px wide
    level = _gray_target(rng, img, pts.mean(0), max(2, s // 8))
    return img * (1 - alpha[..., None]) + np.float32(level) * alpha[..., None]


def _spot(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    h, w = img.shape[:2]
    s = min(h, w)
    c, r = _center(rng, h, w), max(2.5, rng.uniform(0.04, 0.08) * s)
    theta = np.linspace(0, 2 * np.pi, 24, endpoint=False)
    rad = r * (1 + 0.18 * np.convolve(np.r_[rng.normal(0, 1, 24)], np.ones(3) / 3, "same"))
    poly = c + np.stack([rad * np.cos(theta) * rng.uniform(0.7, 1.0), rad * np.sin(theta)], 1)
    canvas = np.zeros((h, w), np.uint8)
    cv2.fillPoly(canvas, [np.round(poly * 16).astype(np.int32)], 255, cv2.LINE_AA, shift=4)
    alpha = _blur(canvas.astype(np.float32) / 255, 0.6)
    level = _gray_target(rng, img, c, int(r))
    return img * (1 - alpha[..., None]) + np.float32(level) * alpha[..., None]


def _crack(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    h, w = img.shape[:2]
    s = min(h, w)
    trunk = random_walk(rng, np.zeros(2), rng.uniform(0, 2 * np.pi), rng.uniform(0.3, 0.5) * s, 0.2)
    trunk += _center(rng, h, w) - trunk.mean(0)
    lines = [trunk]
    for _ in range(int(rng.integers(1, 4))):
        i = int(rng.integers(1, len(trunk) - 1))
        d = trunk[i] - trunk[i - 1]
        heading = np.arctan2(d[1], d[0]) + rng.choice([-1, 1]) * rng.uniform(0.5, 1.1)
        lines.append(random_walk(rng, trunk[i], heading, rng.uniform(0.08, 0.2) * s, 0.3))
    trunk_alpha = polyline_alpha(h, w, lines[:1], 2 if s >= 128 else 1)
    alpha = np.maximum(trunk_alpha, polyline_alpha(h, w, lines[1:], 1))
    level = np.float32(rng.uniform(0.02, 0.08))
    return img * (1 - alpha[..., None]) + level * alpha[..., None]


def _hole(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    h, w = img.shape[:2]
    c, r = _center(rng, h, w), max(2.5, rng.uniform(0.04, 0.09) * min(h, w))
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    d = np.hypot(xx - np.float32(c[0]), yy - np.float32(c[1]))
    disc = np.clip(r + 0.5 - d, 0, 1)  # anti-aliased edge
    rim = np.clip(1 - np.abs(d - (r + 1.2)) / 1.3, 0, 1) * (1 - disc)
    inside = np.float32(rng.uniform(0.02, 0.06)) + np.float32(0.05) * np.clip(d / r, 0, 1)  # darker centre
    out = img * (1 - disc[..., None]) + (inside * disc)[..., None]
    return out + np.float32(rng.uniform(0.15, 0.22)) * rim[..., None]


def _contamination(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    h, w, ch = img.shape
    s = min(h, w)
    c, r = _center(rng, h, w), rng.uniform(0.08, 0.14) * s
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    env = np.exp(-((xx - np.float32(c[0])) ** 2 + (yy - np.float32(c[1])) ** 2) / np.float32(2 * r * r))
    field = env * (1 + 0.5 * _smooth_noise(rng, h, w, max(1.5, s / 24)))  # irregular, localised
    alpha = np.clip((field - 0.45) / 0.2, 0, 1) * np.float32(rng.uniform(0.8, 0.95))
    if ch == 3:
        color = _CONTAMINATION_COLORS[int(rng.integers(len(_CONTAMINATION_COLORS)))]
    else:
        color = np.full(1, _gray_target(rng, img, c, int(r)), np.float32)
    return img * (1 - alpha[..., None]) + color * alpha[..., None]


_DEFECT_FN = {
    "scratch": _scratch,
    "spot": _spot,
    "crack": _crack,
    "hole": _hole,
    "contamination": _contamination,
}


def add_defect(img: np.ndarray, rng: np.random.Generator, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """Paint one defect of ``kind`` onto a float (H, W, C) image in [0, 1]; returns ``(defective, mask)``.

    The defect sits away from the border (its centre in the inner 60%) and covers at least
    ``max(8, min(H, W) // 4)`` pixels. ``mask`` (bool, H x W) is exactly the set of pixels changed by more
    than ``MASK_TOL`` in some channel; smaller changes are reverted. A 2-D input gives a 2-D output.
    """
    if kind not in _DEFECT_FN:
        raise ValueError(f"unknown defect {kind!r}; expected one of {DEFECTS}")
    squeeze = img.ndim == 2
    base = np.asarray(img, np.float32)[..., None] if squeeze else np.asarray(img, np.float32)
    if base.ndim != 3:
        raise ValueError(f"expected an (H, W, C) image, got shape {img.shape}")
    min_area = max(8, min(base.shape[:2]) // 4)
    for _ in range(20):  # a degenerate draw (e.g. a blob thresholded to a speck) is simply redrawn
        out = np.clip(_DEFECT_FN[kind](base, rng), 0.0, 1.0).astype(np.float32)
        mask = (np.abs(out - base) > MASK_TOL).any(-1)
        if mask.sum() >= min_area and mask[2:-2, 2:-2].any():
            out[~mask] = base[~mask]
            return (out[..., 0] if squeeze else out), mask
    raise RuntimeError(f"could not draw a visible {kind!r} defect on this image")  # pragma: no cover


# --------------------------------------------------------------------------------------------- dataset


def _to_uint(img: np.ndarray, bit_depth: int) -> np.ndarray:
    top = 65535 if bit_depth == 16 else 255
    return np.round(np.clip(img, 0, 1) * top).astype(np.uint16 if bit_depth == 16 else np.uint8)


def _write(path: Path, img: np.ndarray, bit_depth: int, fmt: str) -> None:
    arr = _to_uint(img, bit_depth)
    arr = arr[..., 0] if arr.shape[-1] == 1 else arr
    if fmt == "tiff":
        import tifffile

        tifffile.imwrite(path, arr, photometric="rgb" if arr.ndim == 3 else "minisblack", metadata=None)
        return
    bgr = arr[..., ::-1] if arr.ndim == 3 else arr
    params = [cv2.IMWRITE_JPEG_QUALITY, 95] if fmt == "jpg" else [cv2.IMWRITE_PNG_COMPRESSION, 3]
    if not cv2.imwrite(str(path), np.ascontiguousarray(bgr), params):
        raise OSError(f"could not write {path}")


def make_dataset(
    root: str | Path,
    *,
    n_train: int = 60,
    n_test_good: int = 20,
    n_test_defect: int = 20,
    size: int | tuple[int, int] = 64,
    channels: int = 1,
    bit_depth: int = 8,
    texture: str = "grain",
    defects: Sequence[str] = DEFECTS,
    seed: int = 0,
    fmt: str = "png",
) -> dict:
    """Write an MVTec-style dataset under ``root`` and return a summary dict.

    Layout: ``train/good/000.png``, ``test/good/...``, ``test/<defect>/...`` and
    ``ground_truth/<defect>/<stem>_mask.png`` (uint8 0/255, always PNG). Defective test images are split
    round-robin across ``defects``. The default ``texture="grain"`` is one product appearance with per-image
    jitter; ``"mixed"`` draws the family per image (a multi-modal normal class, for harder tests).
    Image ``i`` of each split uses ``default_rng([seed, SPLIT_IDS[split], i])`` (a defective one draws its
    clean image, then the defect, from it): same arguments, byte-identical files; splits are independent.
    """
    h, w = _hw(size)
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    if bit_depth not in (8, 16):
        raise ValueError(f"bit_depth must be 8 or 16, got {bit_depth}")
    if fmt not in FORMATS:
        raise ValueError(f"fmt must be one of {FORMATS}, got {fmt!r}")
    if fmt == "jpg" and bit_depth != 8:
        raise ValueError("jpg supports only bit_depth=8")
    if texture != "mixed" and texture not in TEXTURES:
        raise ValueError(f"unknown texture {texture!r}; expected one of {TEXTURES + ('mixed',)}")
    defects = tuple(dict.fromkeys(defects))  # de-duplicated, order kept
    bad = [d for d in defects if d not in DEFECTS]
    if bad or (n_test_defect and not defects):
        raise ValueError(f"defects must be a non-empty subset of {DEFECTS}, got {defects}")

    root = Path(root)
    ext = {"png": ".png", "tiff": ".tiff", "jpg": ".jpg"}[fmt]
    counts: dict[str, int] = {}

    def rng_for(split: str, i: int) -> np.random.Generator:
        return np.random.default_rng([seed, SPLIT_IDS[split], i])

    def stem(i: int, n: int) -> str:
        return f"{i:0{max(3, len(str(max(n - 1, 0))))}d}"

    for split, sub, n in (("train", "train/good", n_train), ("test_good", "test/good", n_test_good)):
        out = root / sub
        out.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            img = normal_image(rng_for(split, i), (h, w), texture, channels)
            _write(out / f"{stem(i, n)}{ext}", img, bit_depth, fmt)
        counts[sub] = n

    per_kind = {k: sum(1 for i in range(n_test_defect) if defects[i % len(defects)] == k) for k in defects}
    seen = dict.fromkeys(defects, 0)
    for i in range(n_test_defect):
        kind = defects[i % len(defects)]
        rng = rng_for("test_defect", i)
        img, mask = add_defect(normal_image(rng, (h, w), texture, channels), rng, kind)
        name = stem(seen[kind], per_kind[kind])
        seen[kind] += 1
        (root / "test" / kind).mkdir(parents=True, exist_ok=True)
        (root / "ground_truth" / kind).mkdir(parents=True, exist_ok=True)
        _write(root / "test" / kind / f"{name}{ext}", img, bit_depth, fmt)
        cv2.imwrite(str(root / "ground_truth" / kind / f"{name}_mask.png"), mask.astype(np.uint8) * 255)
    counts.update({f"test/{k}": v for k, v in per_kind.items() if v})

    return {
        "root": str(root),
        "counts": counts,
        "size": (h, w),
        "channels": channels,
        "bit_depth": bit_depth,
        "texture": texture,
        "seed": seed,
        "fmt": fmt,
    }
