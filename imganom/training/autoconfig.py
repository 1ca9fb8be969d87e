"""``--config auto``: a configuration chosen from statistics of the normal images (no torch needed).

What it looks at, on up to ``SAMPLE`` evenly spaced training images read at their stored channels and dtype
range:

* **colour vs gray**: the mean spread between channels of a pixel (``max - min`` over R, G, B); above
  ``COLOUR_SPREAD`` the images are colour and the model sees 3 channels (base preset ``industrial-rgb``),
  else 1 (``industrial-gray``). Stacks of more than 4 channels keep them all (``channel_policy: strict``).
* **intensity mode**: a per-image percentile window (1-99 %) when the brightness varies between images
  (standard deviation of the per-image medians above ``BRIGHTNESS_SPREAD`` of the mean within-image range
  p1-p99), when their contrast varies (coefficient of variation of that range above ``CONTRAST_SPREAD``) or
  when the images use only a sliver of their dtype range (mean range below ``NARROW_RANGE``); the dtype range
  otherwise (keeps absolute brightness, which controlled lighting makes meaningful).
* **size**: 128 x 128, or 128 on the short side and the typical aspect ratio on the long side (a multiple of
  16, at most 256) when every image has about the same clearly non-square aspect.
* **map and score**: the base preset's, with ``map: auto``: after training, replaced by the setting that
  scores clearly better on synthetic defects, if any (``training.selfcheck.choose_map``).

Thresholds were set on the synthetic families (controlled lighting: spread <= 0.10, contrast CV <= 0.18) and
magnetic_tile (0.26, 0.33); docs/BENCHMARKS.md has the numbers.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from imganom.config import Config, IntensityConfig, load_config
from imganom.data.readers import ImageReadError, read_image
from imganom.training.paths import training_images

log = logging.getLogger(__name__)

SAMPLE = 64
COLOUR_SPREAD = 0.03
BRIGHTNESS_SPREAD = 0.15
CONTRAST_SPREAD = 0.25
NARROW_RANGE = 0.1
ASPECT_CV = 0.1  # aspect ratios this consistent (coefficient of variation) ...
ASPECT_MIN = 1.4  # ... and at least this far from square give a non-square model input


def image_statistics(data: str | Path, sample: int = SAMPLE) -> dict[str, Any]:
    """Statistics of up to ``sample`` normal images (``train/good`` of an MVTec root, else every image)."""
    paths, _ = training_images(data)
    paths = paths[:: max(1, len(paths) // sample)][:sample]
    rows, channels, dtypes = [], [], set()
    for p in paths:
        try:
            chw, meta = read_image(p, intensity=IntensityConfig(mode="dtype"), channels=None)
        except ImageReadError as e:
            log.warning("config auto: skipping %s", e)
            continue
        rgb = chw[:3] if chw.shape[0] >= 3 else chw[:1]
        gray = rgb.mean(0)
        p1, p50, p99 = np.percentile(gray, [1, 50, 99])
        colour = float((rgb.max(0) - rgb.min(0)).mean())
        rows.append((p1, p50, p99, colour, chw.shape[1], chw.shape[2]))
        channels.append(meta.channels)
        dtypes.add(meta.dtype)
    if not rows:
        raise ValueError(f"none of the sampled images under {data} could be read")
    a = np.asarray(rows, dtype=np.float64)
    rng = a[:, 2] - a[:, 0]
    aspect = a[:, 5] / a[:, 4]
    return {
        "n_images": len(rows),
        "stored_channels": int(np.bincount(channels).argmax()),
        "dtypes": sorted(dtypes),
        "colour_spread": float(a[:, 3].mean()),
        "brightness_spread": float(a[:, 1].std() / max(rng.mean(), 1e-6)),
        "contrast_spread": float(rng.std() / max(rng.mean(), 1e-6)),
        "mean_range": float(rng.mean()),
        "median_size": [int(np.median(a[:, 4])), int(np.median(a[:, 5]))],
        "aspect": float(np.median(aspect)),
        "aspect_cv": float(aspect.std() / aspect.mean()),
    }


def _size(stats: dict[str, Any], multiple: int = 16) -> tuple[int, int]:
    asp = stats["aspect"]
    if stats["aspect_cv"] > ASPECT_CV or 1 / ASPECT_MIN < asp < ASPECT_MIN:
        return (128, 128)
    long = int(min(256, max(128, round(128 * max(asp, 1 / asp) / multiple) * multiple)))
    return (128, long) if asp > 1 else (long, 128)


def auto_config(data: str | Path, overrides: dict[str, Any] | None = None) -> tuple[Config, dict[str, Any]]:
    """A config for the normal images under ``data`` and a record of what was chosen and why."""
    st = image_statistics(data)
    reasons = []
    many = st["stored_channels"] > 4
    colour = not many and st["stored_channels"] >= 3 and st["colour_spread"] > COLOUR_SPREAD
    base = "industrial-rgb" if colour else "industrial-gray"
    channels = st["stored_channels"] if many else 3 if colour else 1
    reasons.append(
        f"{channels} channel{'s' if channels > 1 else ''}: "
        + (
            "a stack of more than 4 channels, kept as stored"
            if many
            else f"colour spread between channels {st['colour_spread']:.3f} "
            + ("> " if colour else "<= ")
            + f"{COLOUR_SPREAD} ({'colour' if colour else 'gray'})"
        )
    )
    why = []
    if st["brightness_spread"] > BRIGHTNESS_SPREAD:
        why.append(
            f"brightness varies between images (spread {st['brightness_spread']:.2f} > {BRIGHTNESS_SPREAD})"
        )
    if st["contrast_spread"] > CONTRAST_SPREAD:
        why.append(f"contrast varies between images (CV {st['contrast_spread']:.2f} > {CONTRAST_SPREAD})")
    if st["mean_range"] < NARROW_RANGE:
        why.append(f"images use little of their dtype range (p1-p99 {st['mean_range']:.3f} < {NARROW_RANGE})")
    intensity = {"mode": "percentile", "low": 1.0, "high": 99.0} if why else {"mode": "dtype"}
    reasons.append(
        "per-image percentile window 1-99 %: " + "; ".join(why)
        if why
        else f"dtype range: brightness spread {st['brightness_spread']:.2f} <= {BRIGHTNESS_SPREAD}, contrast "
        f"CV {st['contrast_spread']:.2f} <= {CONTRAST_SPREAD}"
    )
    size = _size(st)
    reasons.append(
        f"size {size[0]}x{size[1]}: median image {st['median_size'][0]}x{st['median_size'][1]}, aspect "
        f"{st['aspect']:.2f} (CV {st['aspect_cv']:.2f})"
    )
    reasons.append(
        f"map and score settings: map: auto from {base}'s (replaced after training only when synthetic "
        "defects clearly favour another setting)"
    )
    pre: dict[str, Any] = {"size": list(size), "channels": channels, "intensity": intensity}
    if many:
        pre["channel_policy"] = "strict"
    chosen = {"name": "auto", "preprocess": pre, "map": {"auto": True}}
    merged = {**chosen, **(overrides or {})}
    if overrides and "preprocess" in overrides:
        merged["preprocess"] = {**pre, **overrides["preprocess"]}
    cfg = load_config(base, merged)
    info = {"base_preset": base, "chosen": chosen, "statistics": st, "reasons": reasons}
    for r in reasons:
        log.info("config auto: %s", r)
    return cfg, info


def resolve_config(
    name_or_path: str, data: str | Path, overrides: dict[str, Any] | None = None
) -> tuple[Config, dict[str, Any] | None]:
    """``load_config`` for a preset or YAML, or ``auto_config`` for ``"auto"`` (then with its record)."""
    if name_or_path == "auto":
        return auto_config(data, overrides)
    return load_config(name_or_path, overrides), None
