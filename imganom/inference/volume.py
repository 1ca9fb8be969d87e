"""One volume through an Inspector: every slice along a stored axis, reassembled on the volume's own grid.

Slices are decoded by ``data.volumes.slice_item`` (the 2-D read pipeline) and inspected a device batch at a
time; each slice's map and 2-D post-processed mask (threshold, morphology, ROI, min area) go back to their
place in an (X, Y, Z) map and mask volume. The mask's 3-D connected components are the lesions
(``ops.lesions3d``). The volume's score is the highest slice score (and where), its verdict that score
against the image threshold, as for a 2-D image.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from imganom.data.readers import read_options
from imganom.data.volumes import Volume, check_axis, slice_item
from imganom.inference.inspector import Inspector
from imganom.inference.result import Result, verdict
from imganom.ops.lesions3d import Lesion, find_lesions


@dataclass
class VolumeResult:
    """What inspecting one volume gives: per-slice results (maps moved into the volumes) and 3-D lesions."""

    id: str
    axis: int
    score: float
    norm_score: float
    is_anomalous: bool
    slice_index: int  # the slice with the highest score
    slices: list[Result]  # one per slice, in order; their maps/masks are None (they live in the volumes)
    anomaly_map: np.ndarray  # (X, Y, Z) float32
    mask: np.ndarray  # (X, Y, Z) uint8 0/1
    lesions: list[Lesion] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def verdict(self) -> str:
        return "NG" if self.is_anomalous else "OK"


def inspect_volume(
    insp: Inspector, vol: Volume, axis: int = 2, *, batch_size: int = 16, connectivity: int = 3
) -> VolumeResult:
    """Inspect every slice of ``vol`` along stored ``axis``; raises ``ImageReadError`` (a slice cannot be
    normalised) or the backend's error (a batch cannot be inspected)."""
    check_axis(axis)
    t0 = time.perf_counter()
    n = vol.n_slices(axis)
    kw = read_options(insp.cfg.preprocess)
    amap = np.zeros(vol.shape, np.float32)
    mask = np.zeros(vol.shape, np.uint8)
    amap_s, mask_s = np.moveaxis(amap, axis, 0), np.moveaxis(mask, axis, 0)  # views: slice k = [k]

    def batches() -> Iterator[tuple[None, list, list[float]]]:
        for start in range(0, n, batch_size):
            items, ms = [], []
            for k in range(start, min(n, start + batch_size)):
                t = time.perf_counter()
                chw, meta = slice_item(vol, axis, k, **kw)
                items.append((f"{vol.id}#slice={k:04d}", chw, meta))
                ms.append((time.perf_counter() - t) * 1e3)
            yield None, items, ms

    results: list[Result] = []
    for _, rs in insp.predict_stream(batches()):
        assert not isinstance(rs, Exception)  # errors="raise"
        for r in rs:
            k = len(results)
            if r.anomaly_map is not None:  # None for OK slices with Inspector(maps="ng")
                amap_s[k] = r.anomaly_map
                mask_s[k] = r.mask
            r.anomaly_map, r.mask, r.size = None, None, amap_s[k].shape
            results.append(r)
    scores = np.array([r.score for r in results], np.float64)
    k_max = int(np.argmax(scores))
    norm, bad = verdict(float(scores[k_max]), insp.image_threshold, insp.score_scale)
    lesions = find_lesions(mask, amap, vol.affine, axis=axis, connectivity=connectivity)
    return VolumeResult(
        vol.id, axis, float(scores[k_max]), norm, bad, k_max, results, amap, mask, lesions,
        time.perf_counter() - t0,
    )  # fmt: skip
