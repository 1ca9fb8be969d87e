"""Output writers: file naming, atomic writes, image encoders, overlays and the results tables."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from imganom.reporting.results import CSV_COLUMNS, ResultsWriter, read_jsonl
from imganom.reporting.writers import (
    OutputOptions,
    colorize,
    encode_jpeg,
    encode_png,
    heatmap_vmax,
    output_stem,
    render_overlay,
    write_item_outputs,
)
from imganom.utils.files import atomic_write_bytes, write_json_atomic


def _scene(h: int = 96, w: int = 128) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Grey preview with a gradient, a map with one hot blob, and the blob's mask."""
    preview = np.dstack([np.tile(np.linspace(40, 200, w, dtype=np.uint8), (h, 1))] * 3)
    yy, xx = np.mgrid[:h, :w]
    amap = (0.01 + 0.5 * np.exp(-((yy - 40) ** 2 + (xx - 70) ** 2) / 60.0)).astype(np.float32)
    return preview, amap, amap > 0.2


def _decode(path: Path, flags: int = cv2.IMREAD_UNCHANGED) -> np.ndarray:
    img = cv2.imdecode(np.frombuffer(path.read_bytes(), np.uint8), flags)
    assert img is not None, path
    return img


def test_output_stem_keeps_extension_and_folders() -> None:
    stems = {output_stem(i) for i in ("a.png", "a.tif", "sub/a.png", "a")}
    assert len(stems) == 4
    assert output_stem("sub/a.png") == "sub/a_png"
    assert output_stem("vol/b.nii.gz#slice=0003") == "vol/b_nii_gz_slice0003"


def test_output_stem_disambiguates_look_alikes_and_keeps_plain_names() -> None:
    assert output_stem("a.b.png") == "a.b_png" and output_stem("a_b.png") == "a_b_png"
    assert output_stem("sub/a.png~2") == "sub/a_png~2"
    for pair in (("x<.png", "x>.png"), ("n\nl.png", "n\tl.png"), ("a.png", "a.PNG")):
        assert output_stem(pair[0]) != output_stem(pair[1])
    assert output_stem("x<.png").startswith("x__png~h") and len(output_stem("x<.png")) == len("x__png~h") + 8
    assert output_stem("bad\\xff\\xfe.png").startswith("bad_xff_xfe_png~h")  # a non-UTF-8 name's id
    assert len(output_stem("x" * 400 + ".png").encode()) < 200


_PIECES = st.sampled_from(["a", "b", ".", "_", "#", "=", "~", "~2", "<", ">", "\n", "\t", "\\", " ", "é"])
_IDS = st.builds(
    lambda folders, base, ext, copy, sl: "/".join([*folders, "".join(base) + ext + copy + sl]),
    st.lists(st.sampled_from(["d", "d_", "d.", "..", ".", "", "<"]), max_size=2),
    st.lists(_PIECES, max_size=4),
    st.sampled_from([".png", ".PNG", ".nii.gz", ".nii", ".gz", ".tif", ".tiff", ""]),
    st.sampled_from(["", "~2", "~12"]),
    st.sampled_from(["", "#slice=0003", "#slice=3", "#slice="]),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(_IDS, min_size=2, max_size=40, unique=True))
def test_output_stem_is_one_to_one(ids: list[str]) -> None:
    """Ids built from the pieces that sanitising folds together never share a stem."""
    assert len({output_stem(i) for i in ids}) == len(ids)


@pytest.mark.parametrize("item_id", ["../../etc/passwd", "/abs/x.png", "a/./../b.png", "c:\\w\\x?.png"])
def test_output_stem_never_escapes(item_id: str, tmp_path: Path) -> None:
    stem = output_stem(item_id)
    target = (tmp_path / f"{stem}.png").resolve()
    assert target.is_relative_to(tmp_path.resolve())
    assert not any(ch in stem for ch in "\\:?#=")


def test_atomic_write_replaces_and_leaves_no_temp(tmp_path: Path) -> None:
    p = tmp_path / "deep" / "er" / "f.bin"
    atomic_write_bytes(p, b"one")
    atomic_write_bytes(p, b"two")
    assert p.read_bytes() == b"two"
    assert [x.name for x in p.parent.iterdir()] == ["f.bin"]


def test_atomic_write_failure_keeps_old_file(tmp_path: Path) -> None:
    p = tmp_path / "f.bin"
    p.write_bytes(b"old")
    with pytest.raises(TypeError):
        atomic_write_bytes(p, "not bytes")  # type: ignore[arg-type]
    assert p.read_bytes() == b"old"
    assert [x.name for x in tmp_path.iterdir()] == ["f.bin"]


def test_encoders_roundtrip_rgb_and_uint16(tmp_path: Path) -> None:
    rgb = np.zeros((8, 10, 3), np.uint8)
    rgb[..., 0] = 255  # pure red must stay red (RGB -> BGR conversion)
    back = cv2.imdecode(np.frombuffer(encode_png(rgb), np.uint8), cv2.IMREAD_UNCHANGED)
    assert back.shape == (8, 10, 3) and back[0, 0].tolist() == [0, 0, 255]  # BGR on disk
    u16 = np.arange(80, dtype=np.uint16).reshape(8, 10) * 800
    back16 = cv2.imdecode(np.frombuffer(encode_png(u16), np.uint8), cv2.IMREAD_UNCHANGED)
    assert back16.dtype == np.uint16 and np.array_equal(back16, u16)
    jpg = cv2.imdecode(np.frombuffer(encode_jpeg(rgb, quality=95), np.uint8), cv2.IMREAD_COLOR)
    assert jpg[4, 5, 2] > 200 and jpg[4, 5, 0] < 60
    with pytest.raises(ValueError):
        encode_png(np.zeros((4, 4), np.float32))


def test_colorize_clips_to_range() -> None:
    amap = np.array([[-1.0, 0.0, 0.5, 1.0, 9.0, np.nan]], np.float32)
    c = colorize(amap, 0.0, 1.0)
    assert c.shape == (1, 6, 3) and c.dtype == np.uint8
    assert np.array_equal(c[0, 0], c[0, 1])  # below vmin clips to vmin
    assert np.array_equal(c[0, 3], c[0, 4])  # above vmax clips to vmax
    assert np.array_equal(c[0, 5], c[0, 1])  # NaN shows as vmin
    assert c[0, 1].sum() < 30 and c[0, 3].sum() > 500  # inferno: black -> pale yellow
    assert not np.array_equal(c[0, 2], c[0, 1])
    jet = colorize(amap, 0.0, 1.0, cmap="jet")
    assert jet[0, 1, 2] > 100 and jet[0, 3, 0] > 100  # jet: blue -> red, in RGB order
    with pytest.raises(ValueError):
        colorize(amap, 0, 1, cmap="nope")


def test_render_overlay_marks_the_region_only() -> None:
    preview, amap, mask = _scene()
    out = render_overlay(preview, amap, mask, threshold=0.2, vmax=0.5, score=0.87, verdict="NG")
    assert out.shape == preview.shape and out.dtype == np.uint8
    diff = np.abs(out.astype(int) - preview.astype(int)).sum(-1)
    assert diff[40, 70] > 60  # blob centre is blended
    assert diff[80, 120] == 0  # far from the blob and the label: untouched
    assert diff[:8, :20].sum() > 0  # the label box in the top-left corner
    assert out[40:, :].reshape(-1, 3)[:, 0].max() == 255  # red contour drawn around the region
    empty = np.zeros_like(mask)
    ok = render_overlay(preview, amap * 0.1, empty, threshold=0.2, vmax=0.5, score=0.1, verdict="OK")
    assert np.array_equal(ok[30:, :], preview[30:, :])  # below half the threshold nothing is blended


@pytest.mark.parametrize("side", [24, 64, 4000])
def test_render_overlay_label_scales(side: int) -> None:
    preview = np.full((side, side, 3), 128, np.uint8)
    amap = np.zeros((side, side), np.float32)
    out = render_overlay(preview, amap, amap > 1, threshold=1.0, vmax=2.0, score=0.12, verdict="OK")
    changed = np.argwhere(np.any(out != preview, axis=-1))
    h, w = changed.max(0) + 1
    assert 0.05 * side <= h <= max(0.2 * side, 16) and w <= side


def test_render_overlay_resizes_map_to_preview() -> None:
    preview, amap, mask = _scene(400, 600)
    small = cv2.resize(preview, (150, 100), interpolation=cv2.INTER_AREA)
    out = render_overlay(small, amap, mask, threshold=0.2, vmax=0.5, score=1.0, verdict="NG")
    assert out.shape == (100, 150, 3)


def test_write_item_outputs_layout(tmp_path: Path) -> None:
    preview, amap, mask = _scene(300, 700)
    opts = OutputOptions(raw_maps="png16", max_preview_side=256)
    paths = write_item_outputs(tmp_path, "sub/x.nii.gz#slice=0002", preview, amap, mask, threshold=0.2,
                               vmax=0.5, score=0.9, verdict="NG", options=opts)  # fmt: skip
    assert paths == {
        "mask": "masks/sub/x_nii_gz_slice0002.png",
        "heatmap": "heatmaps/sub/x_nii_gz_slice0002.png",
        "overlay": "overlays/sub/x_nii_gz_slice0002.png",
        "preview": "previews/sub/x_nii_gz_slice0002.jpg",
        "raw_map": "raw/sub/x_nii_gz_slice0002.png",
    }
    m = _decode(tmp_path / paths["mask"])
    assert m.shape == (300, 700) and set(np.unique(m)) == {0, 255}
    assert np.array_equal(m > 0, mask)
    assert _decode(tmp_path / paths["heatmap"]).shape == (300, 700, 3)
    assert _decode(tmp_path / paths["overlay"]).shape == (110, 256, 3)
    assert _decode(tmp_path / paths["preview"]).shape == (110, 256, 3)
    raw = _decode(tmp_path / paths["raw_map"])
    assert raw.dtype == np.uint16
    np.testing.assert_allclose(raw / 65535 * 0.5, np.minimum(amap, 0.5), atol=1e-4)

    npy_only = OutputOptions(masks=False, heatmaps=False, overlays=False, previews=False, raw_maps="npy")
    only = write_item_outputs(tmp_path, "y.png", preview, amap, mask, threshold=0.2, vmax=0.5, score=0.1,
                              verdict="OK", options=npy_only)  # fmt: skip
    assert only == {"raw_map": "raw/y_png.npy"}
    arr = np.load(tmp_path / only["raw_map"])
    assert arr.dtype == np.float16 and arr.shape == amap.shape
    assert not list(tmp_path.rglob("*.tmp"))
    with pytest.raises(ValueError):
        OutputOptions(raw_maps="tiff")


def _row(i: str, score: float | None = 0.5, **kw) -> dict:
    return {"id": i, "path": f"/data/{i}", "status": "ok", "verdict": "OK", "score": score, **kw}


def test_results_writer_resume_drops_truncated_line(tmp_path: Path) -> None:
    with ResultsWriter(tmp_path) as w:
        w.write(_row("a.png", regions=[{"id": 1, "area": np.int64(5)}], extra=np.float32(1.5)))
        w.write(_row("b.png", score=float("nan")))
    jsonl = tmp_path / "results.jsonl"
    first = json.loads(jsonl.read_text().splitlines()[0])
    assert first["regions"][0]["area"] == 5 and first["extra"] == 1.5 and first["outputs"] == {}
    assert set(CSV_COLUMNS) <= set(first)
    with open(jsonl, "a") as f:
        f.write('{"id": "c.png", "score": 0.')  # a run killed mid-append

    w = ResultsWriter(tmp_path, resume=True)
    assert w.done_ids == {"a.png", "b.png"}
    lines = jsonl.read_text().splitlines()
    assert len(lines) == 2 and json.loads(lines[1])["score"] is None
    w.write(_row("c.png"))
    w.close()
    assert [json.loads(x)["id"] for x in jsonl.read_text().splitlines()] == ["a.png", "b.png", "c.png"]

    ResultsWriter(tmp_path).close()  # resume=False starts over
    assert jsonl.read_text() == ""


def test_results_writer_rejects_corruption_in_the_middle(tmp_path: Path) -> None:
    (tmp_path / "results.jsonl").write_text('{"id": "a"}\nnot json\n{"id": "b"}\n')
    with pytest.raises(ValueError, match="line 2"):
        ResultsWriter(tmp_path, resume=True)


def test_finalize_orders_dedups_and_writes_csv(tmp_path: Path) -> None:
    with ResultsWriter(tmp_path) as w:
        w.write(_row("b.png", score=0.2))
        w.write(_row("a.png", score=0.1))
        w.write({"id": "c.png", "status": "error", "error": 'bad, "file"\nline2'})
        w.write(_row("b.png", score=0.3, verdict="NG"))  # retried: last row wins
        w.write(_row("z.png", score=0.4))  # not in the order: kept at the end
        rows = w.finalize(["a.png", "b.png", "c.png", "missing.png"])
    assert [r["id"] for r in rows] == ["a.png", "b.png", "c.png", "z.png"]
    assert rows[1]["score"] == 0.3 and rows[1]["verdict"] == "NG"
    assert [json.loads(x)["id"] for x in (tmp_path / "results.jsonl").read_text().splitlines()] == [
        "a.png", "b.png", "c.png", "z.png"]  # fmt: skip

    with open(tmp_path / "results.csv", newline="", encoding="utf-8") as f:
        table = list(csv.reader(f))
    assert tuple(table[0]) == CSV_COLUMNS == (
        "id", "path", "status", "verdict", "score", "norm_score", "n_regions", "max_region_area",
        "image_threshold", "pixel_threshold", "model_id", "time_ms", "error", "confidence")  # fmt: skip
    assert [r[0] for r in table[1:]] == ["a.png", "b.png", "c.png", "z.png"]
    err = dict(zip(CSV_COLUMNS, table[3], strict=True))
    assert err["status"] == "error" and err["error"] == 'bad, "file"\nline2' and err["score"] == ""
    assert float(dict(zip(CSV_COLUMNS, table[2], strict=True))["score"]) == 0.3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.csv", "results.jsonl"]
    with pytest.raises(ValueError):
        w.write(_row("late.png"))


def test_write_json_atomic(tmp_path: Path) -> None:
    p = tmp_path / "s" / "summary.json"
    write_json_atomic(p, {"x": np.float64(0.5), "n": float("inf"), "p": Path("a/b")})
    assert json.loads(p.read_text()) == {"x": 0.5, "n": None, "p": "a/b"}
    assert [x.name for x in p.parent.iterdir()] == ["summary.json"]


def test_read_jsonl_tolerates_only_a_torn_last_line(tmp_path: Path) -> None:
    p = tmp_path / "results.jsonl"
    assert read_jsonl(p) == ([], False)
    p.write_text('{"id": "a"}\n{"id": "b"}\n')
    assert read_jsonl(p) == ([{"id": "a"}, {"id": "b"}], False)
    p.write_text('{"id": "a"}\n{"id": "b", "sco')  # killed mid-append
    assert read_jsonl(p) == ([{"id": "a"}], True)
    p.write_text('{"id": "a"}\n{"id": "b"}')  # complete row, newline missing
    assert read_jsonl(p) == ([{"id": "a"}, {"id": "b"}], True)
    p.write_text('{"id": "a"}\nnot json\n{"id": "c"}\n')
    with pytest.raises(ValueError, match="line 2"):
        read_jsonl(p)


def test_heatmap_vmax_is_twice_the_image_threshold() -> None:
    assert heatmap_vmax(0.3, 5.0) == 0.6  # calibrated: the threshold sits mid-scale whatever the score
    assert heatmap_vmax(None, 0.8) == 0.8  # uncalibrated: the image's own score
    assert heatmap_vmax(0.0, 0.0) == 1e-6 and heatmap_vmax(-1.0, 2.0) == 2.0  # never an empty scale
