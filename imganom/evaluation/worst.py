"""The worst false positives and negatives of an evaluation: kept as small thumbnails while the test set
streams past (a bounded heap each), rendered as overlay PNGs under ``OUT/worst/`` at the end."""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from imganom.data.readers import to_uint8_preview
from imganom.inference.inspector import Result
from imganom.reporting.writers import encode_png, render_overlay
from imganom.utils.files import atomic_write_bytes

OVERLAY_SIDE = 320  # max side of the worst-case overlays
GT_COLOUR = (40, 200, 255)  # ground-truth outline in the overlays (RGB)


@dataclass
class Thumb:
    """A worst case shrunk to overlay size when it enters the heap; rendered only if it is still there at
    the end (rendering at full size costs ~0.1 s per 1024 px image)."""

    preview: np.ndarray  # HxWx3 uint8
    amap: np.ndarray  # float32
    mask: np.ndarray  # predicted, bool
    gt: np.ndarray | None  # ground truth, bool
    amax: float  # maximum of the full-resolution map


def thumb(r: Result, gt: np.ndarray | None) -> Thumb:
    """``r``'s input, map and mask (and the ground truth) shrunk to at most ``OVERLAY_SIDE``."""
    h, w = r.anomaly_map.shape
    f = min(1.0, OVERLAY_SIDE / max(h, w))
    size = (max(1, round(w * f)), max(1, round(h * f)))

    def shrink(a: np.ndarray) -> np.ndarray:
        a = np.asarray(a, dtype=np.float32)
        return a if a.shape == (size[1], size[0]) else cv2.resize(a, size, interpolation=cv2.INTER_AREA)

    if r.image is not None:
        preview = to_uint8_preview(np.stack([shrink(c) for c in r.image[:3]]))
    else:
        preview = np.zeros((size[1], size[0], 3), np.uint8)
    return Thumb(
        preview, shrink(r.anomaly_map), shrink(r.mask) > 0, None if gt is None else shrink(gt) > 0,
        float(r.anomaly_map.max()),
    )  # fmt: skip


@dataclass(order=True)
class Case:
    key: float  # heap key: the smallest key is evicted first
    seq: int
    info: dict[str, Any] = field(compare=False)
    thumb: Thumb = field(compare=False)


class WorstCases:
    """The ``k`` cases with the largest ``key``, each with a small thumbnail for its overlay."""

    def __init__(self, k: int):
        self.k, self.heap, self._seq = k, [], 0

    def wants(self, key: float) -> bool:
        return self.k > 0 and (len(self.heap) < self.k or key > self.heap[0].key)

    def push(self, key: float, info: dict[str, Any], thumb: Thumb) -> None:
        self._seq += 1
        case = Case(key, self._seq, info, thumb)
        if len(self.heap) < self.k:
            heapq.heappush(self.heap, case)
        else:
            heapq.heapreplace(self.heap, case)

    def sorted(self) -> list[Case]:
        return sorted(self.heap, reverse=True)


def overlay_png(t: Thumb, score: float, thr_p: float | None, flagged: bool) -> bytes:
    """The overlay: map blended in, predicted regions outlined (red NG / green OK), ground truth in cyan."""
    thr = thr_p if thr_p is not None else max(t.amax, 1e-6) / 2
    ov = render_overlay(
        t.preview, t.amap, t.mask, threshold=thr, vmax=max(2 * thr, t.amax),
        score=score, verdict="NG" if flagged else "OK",
    )  # fmt: skip
    if t.gt is not None and t.gt.any():
        contours, _ = cv2.findContours(t.gt.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(ov, contours, -1, GT_COLOUR, 1, cv2.LINE_AA)
    return encode_png(ov)


def write_worst(
    out: Path, cases: dict[str, WorstCases], thr_p: float | None
) -> dict[str, list[dict[str, Any]]]:
    """Write ``out/worst/<name>_NN.png`` for each heap (worst first), replacing an earlier run's files;
    returns ``{name: [case info + "overlay": relative path]}``."""
    for stale in (out / "worst").glob("false_*.png"):  # from an earlier run into the same folder
        stale.unlink()
    written: dict[str, list[dict[str, Any]]] = {}
    for name, heap in cases.items():
        written[name] = []
        for k, case in enumerate(heap.sorted(), 1):
            rel = f"worst/{name}_{k:02d}.png"
            png = overlay_png(case.thumb, case.info["score"], thr_p, case.info["flagged"])
            atomic_write_bytes(out / rel, png)
            written[name].append({**case.info, "overlay": rel})
    return written
