"""The cheaper output writing (issue 16) writes the same pixels: indexed-colour heatmaps decode to
``colorize``'s RGB, overlays blended only around hot pixels equal the whole-image blend, the gray preview
shortcut equals the three-channel formula; overlays for NG images only by default; text from threads."""

from __future__ import annotations

import threading
from pathlib import Path

import cv2
import numpy as np
import pytest

from imganom.data.readers import to_uint8_preview
from imganom.reporting.writers import (
    OutputOptions,
    colorize,
    heatmap_png,
    render_overlay,
    write_item_outputs,
)


def _maps(seed: int, h: int = 70, w: int = 90) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    amap = cv2.GaussianBlur(rng.random((h, w)).astype(np.float32), (0, 0), 4) * 3 - 0.5
    amap[3:6, 2:9] = np.nan
    amap[10, 10], amap[11, 11] = np.inf, -np.inf
    return amap, rng.integers(0, 255, (h, w), dtype=np.uint8)


@pytest.mark.parametrize("cmap", ["inferno", "jet"])
def test_heatmap_png_decodes_to_colorize(cmap: str) -> None:
    amap, _ = _maps(0)
    png = heatmap_png(amap, 0.0, 2.0, cmap)
    rgb = cv2.cvtColor(cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    assert np.array_equal(rgb, colorize(amap, 0.0, 2.0, cmap))
    assert len(png) < colorize(amap, 0.0, 2.0).nbytes / 2


def _blend_everywhere(preview: np.ndarray, amap: np.ndarray, threshold: float, vmax: float) -> np.ndarray:
    """The former formula: every pixel blended (weight 0 where the map is below half the threshold)."""
    base = cv2.cvtColor(preview, cv2.COLOR_GRAY2RGB)
    lo = 0.5 * threshold
    weight = 0.45 * np.clip((np.nan_to_num(amap) - lo) / max(threshold - lo, 1e-12), 0.0, 1.0)[..., None]
    colour = colorize(amap, lo, max(vmax, lo + 1e-6)).astype(np.float32)
    return np.rint(base * (1.0 - weight) + colour * weight).astype(np.uint8)


@pytest.mark.filterwarnings("ignore:overflow encountered")  # the +-inf pixels in the former formula
@pytest.mark.parametrize("quantile", [0.3, 0.9, 0.999, 1.0])
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_overlay_blend_box_equals_whole_image_blend(quantile: float, sign: float) -> None:
    amap, preview = _maps(int(quantile * 1000))
    threshold = sign * float(np.quantile(np.nan_to_num(amap, posinf=0, neginf=0), quantile))
    got = render_overlay(preview, amap, np.zeros(amap.shape, bool), threshold=threshold, vmax=4.0, score=1.0,
                         verdict="OK")  # fmt: skip
    want = _blend_everywhere(preview, amap, threshold, 4.0)
    label = 20  # the label box in the top-left corner is drawn on top
    assert np.array_equal(got[label:], want[label:]) and np.array_equal(got[:, 40:], want[:, 40:])


def test_gray_preview_equals_three_channel_formula() -> None:
    rng = np.random.default_rng(0)
    for shape in [(1, 64, 48), (2, 5, 7), (64, 48)]:
        x = (rng.random(shape) * 1.4 - 0.2).astype(np.float32)
        x.flat[::13], x.flat[::17], x.flat[::19] = np.nan, np.inf, -np.inf
        a = np.asarray(x)[None] if x.ndim == 2 else x
        three = np.clip(np.nan_to_num(np.repeat(a[:1], 3, 0), nan=0.0, posinf=1.0, neginf=0.0), 0.0, 1.0)
        want = (three * 255.0 + 0.5).astype(np.uint8).transpose(1, 2, 0)
        got = to_uint8_preview(x)
        assert got.flags.c_contiguous and np.array_equal(got, want), shape


def test_overlays_for_ng_images_by_default(tmp_path: Path) -> None:
    amap, preview = _maps(1)
    kw = dict(threshold=1.0, vmax=2.0, score=1.0)
    for options, verdicts in [
        (OutputOptions(), {"NG", None}),
        (OutputOptions(overlays="all"), {"NG", "OK", None}),
        (OutputOptions(overlays=True), {"NG", "OK", None}),
        (OutputOptions(overlays="none"), set()),
        (OutputOptions(overlays=False), set()),
    ]:
        for verdict in ("NG", "OK", None):
            out = write_item_outputs(tmp_path, f"{verdict}.png", preview, amap, amap > 1, verdict=verdict,
                                     options=options, **kw)  # fmt: skip
            assert ("overlay" in out) == (verdict in verdicts), (options.overlays, verdict)
            assert {"mask", "heatmap", "preview"} <= out.keys()
    with pytest.raises(ValueError, match="overlays"):
        OutputOptions(overlays="some")


def test_overlays_render_from_many_threads() -> None:
    """Labels are drawn under a lock: concurrent renders (the writer pool) neither crash nor differ."""
    amap, preview = _maps(2, 256, 256)
    want = render_overlay(preview, amap, amap > 1, threshold=1.0, vmax=2.0, score=0.5, verdict="NG")
    bad: list[int] = []
    barrier = threading.Barrier(4)

    def work() -> None:
        barrier.wait()
        for _ in range(20):
            got = render_overlay(preview, amap, amap > 1, threshold=1.0, vmax=2.0, score=0.5, verdict="NG")
            bad.extend([1] if not np.array_equal(got, want) else [])

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert bad == []
