"""Hostile inputs for the readers, each built here: budgets in bytes checked from the header for every format,
header claims against the file size, slice/frame caps, degenerate images; peak memory measured."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
import tracemalloc
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import tifffile
from image_files import (
    RNG,
    H,
    W,
    bmp_claim,
    dicom_deflated,
    gz,
    jpeg_claim,
    nifti_header,
    png_zeros,
    sample_files,
    tiff_ifd_loop,
    tiff_planes_claim,
    tiff_strip_bomb,
    write_dicom,
)
from PIL import Image

from imganom.config import IntensityConfig, PreprocessConfig
from imganom.data.readers import (
    MAX_SLICES,
    ImageReadError,
    count_slices,
    iter_items,
    read_image,
    read_image_bytes,
    read_options,
)
from imganom.data.readers.tiff import MAX_IFDS

PERCENTILE = IntensityConfig(mode="percentile", low=0, high=100)
# decoded bytes of one item (H x W x channels x bytes per sample) of each sample file
ITEM_BYTES = {"gray8.png": H * W, "rgb8.png": H * W * 3, "rgba8.png": H * W * 4, "gray16.png": H * W * 2,
              "rgb16.png": H * W * 6, "rgb.jpg": H * W * 3, "rgb.bmp": H * W * 3, "u16.tif": H * W * 2,
              "ct.dcm": H * W * 2, "vol.nii.gz": H * W * 4}  # fmt: skip


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return sample_files(tmp_path_factory.mktemp("samples"))


def _err(path: Path, **kw) -> str:
    with pytest.raises(ImageReadError) as ei:
        read_image(path, **kw)
    assert ei.value.path == str(path) and str(ei.value).startswith(f"{path}: ")
    return ei.value.reason


def _slice0(name: str) -> dict:
    return {"slice_index": 0} if ".nii" in name else {}


# ------------------------------------------------------------------------------------------ byte budget


def test_max_bytes_is_a_preprocess_option(files):
    assert read_options(PreprocessConfig(max_bytes=1234))["max_bytes"] == 1234
    assert PreprocessConfig().max_bytes == 128 * 2**20
    with pytest.raises(TypeError, match="unexpected keyword argument.*max_byte"):
        read_image(files["gray8.png"], max_byte=10)  # a misspelt budget is never ignored


@pytest.mark.parametrize("name", ITEM_BYTES)
def test_byte_budget_counts_channels_and_sample_size_for_every_format(files, name):
    n = ITEM_BYTES[name]
    reason = _err(files[name], max_bytes=n - 1, **_slice0(name))
    assert f"= {n} bytes > max_bytes={n - 1}" in reason and reason.startswith("too many pixels")
    read_image(files[name], max_bytes=n, **_slice0(name))


def test_byte_budget_multi_page_compressed_tiff_and_dicom_frames(tmp_path):
    pages = RNG.integers(0, 65536, (5, H, W), dtype=np.uint16)
    tifffile.imwrite(tmp_path / "pages.tif", pages, compression="zlib")  # 5 pages read as 5 channels
    reason = _err(tmp_path / "pages.tif", max_bytes=H * W * 10 - 1)
    assert f"x 5 channel(s) x 2 byte(s) = {H * W * 10} bytes" in reason
    frames = write_dicom(tmp_path / "mf.dcm", RNG.integers(0, 4096, (4, H, W), dtype=np.uint16))
    read_image(frames, max_bytes=H * W * 2, slice_index=3)  # the budget is per decoded frame
    assert f"= {H * W * 2} bytes" in _err(frames, max_bytes=H * W * 2 - 1, slice_index=3)


# memory of refusals: a fresh interpreter reads every bomb; its peak RSS may grow by at most this much
REFUSAL_RSS_BOUND_MB = 48
_MEASURE = textwrap.dedent("""
    import json, resource, sys
    import cv2, nibabel, pydicom, tifffile
    from imganom.data.readers import read_image, read_image_bytes, count_slices, ImageReadError
    cases = json.loads(sys.argv[1])
    for c in cases:  # warm-up: load every decoder on a small valid file
        if c["name"].startswith("ok_"):
            read_image(c["path"], **c["kw"])
    rss = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    before, out = rss(), {}
    for c in cases:
        data = open(c["path"], "rb").read()
        for how, fn in (("file", lambda: read_image(c["path"], **c["kw"])),
                        ("bytes", lambda: read_image_bytes(data, c["path"], **c["kw"]))):
            try:
                x, meta = fn()
                out[c["name"] + ":" + how] = "ok %s" % (x.shape,)
            except ImageReadError as e:
                out[c["name"] + ":" + how] = e.reason
        del data
    print(json.dumps({"grown_mb": (rss() - before) / 1024, "out": out}))
""")


def test_bombs_are_refused_from_the_header_with_low_peak_memory(tmp_path, files):
    bombs = {
        # 164 KB PNG claiming 13000 x 13000 (169 MB decoded): the default byte budget refuses it
        "png8_13000.png": (png_zeros(13000, 13000), {}, "169000000 bytes > max_bytes=134217728"),
        "png16_rgba.png": (png_zeros(3000, 3000, bit_depth=16, colour=6), {"max_bytes": 16 << 20},
                           "3000x3000 x 4 channel(s) x 2 byte(s) = 72000000 bytes"),
        "jpeg_9000.jpg": (jpeg_claim(9000, 9000), {}, "9000x9000 x 3 channel(s) x 1 byte(s) = 243000000"),
        "bmp_9000.bmp": (bmp_claim(9000, 9000), {}, "9000x9000 x 3 channel(s) x 1 byte(s) = 243000000"),
        # zlib TIFF of 16 float64 planes claiming 4096 x 4096 each (2 GiB decoded)
        "planes.tif": (tiff_planes_claim(16, 4096), {}, "4096x4096 x 16 channel(s) x 8 byte(s) = 2147483648"),
        "dicom_rows.dcm": (None, {}, "header claims 1 frame(s) of 9000x9000x1 at 16 bits = 162000000 bytes"),
        "dicom_frames.dcm": (None, {}, "header claims 1000000000000 frames, more than the limit of 10000"),
        "deflated.dcm": (dicom_deflated(64 << 20), {"max_bytes": 1 << 20}, "deflated DICOM data inflates"),
        "nifti2_claim.nii": (nifti_header((8, 8, 10**12)), {}, "header claims 1000000000000 slices"),
        "nifti1_claim.nii.gz": (gz(nifti_header((9000, 9000, 4), np.float32, version=1)), {"slice_index": 0},
                                "voxel data of shape (9000, 9000, 4) (float32) = 1296000352 bytes"),
        # an 8 x 8 TIFF whose one zlib strip inflates to 256 MB: decoded, but only the 64 bytes it needs
        "strip_bomb.tif": (tiff_strip_bomb(256 << 20), {}, "ok (1, 8, 8)"),
    }  # fmt: skip
    write_dicom(tmp_path / "dicom_rows.dcm", np.zeros((2, 2), np.uint16))  # then Rows = Columns = 9000:
    rows = (tmp_path / "dicom_rows.dcm").read_bytes()
    for tag in (b"\x28\x00\x10\x00", b"\x28\x00\x11\x00"):
        rows = rows.replace(tag + b"US\x02\x00\x02\x00", tag + b"US\x02\x00\x28\x23")
    (tmp_path / "dicom_rows.dcm").write_bytes(rows)
    write_dicom(tmp_path / "dicom_frames.dcm", np.zeros((8, 8), np.uint16), frames="1000000000000")
    cases = [{"name": f"ok_{n}", "path": str(p), "kw": _slice0(n)} for n, p in files.items()]
    for name, (data, kw, _) in bombs.items():
        if data is not None:
            (tmp_path / name).write_bytes(data)
        cases.append({"name": name, "path": str(tmp_path / name), "kw": kw})
    r = subprocess.run([sys.executable, "-c", _MEASURE, json.dumps(cases)], capture_output=True, text=True,
                       timeout=120)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    for name, (_, _, words) in bombs.items():
        for how in ("file", "bytes"):
            assert words in res["out"][f"{name}:{how}"], (name, how, res["out"][f"{name}:{how}"])
    assert res["grown_mb"] < REFUSAL_RSS_BOUND_MB, res["grown_mb"]


@pytest.mark.parametrize(("shape", "channels"), [((600, 800), None), ((600, 800), 3), ((600, 800, 3), 1),
                                                 ((600, 800, 4), 3), ((600, 800, 3), None)])  # fmt: skip
def test_decode_peak_is_bounded_by_the_item_and_its_output(tmp_path, shape, channels):
    """Peak decode memory (numpy, traced) <= stored item + 2 x the larger float32 copy (input channels or
    output channels): with the byte budget on the item, a bound per image (docs/RELIABILITY.md)."""
    p = tmp_path / "x.png"
    Image.fromarray(RNG.integers(0, 256, shape, dtype=np.uint8)).save(p, compress_level=1)
    read_image(p, channels=channels)
    tracemalloc.start()
    x, meta = read_image(p, channels=channels)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    item = int(np.prod(shape))  # 8-bit samples
    assert peak <= item + 2 * max(4 * item, x.nbytes), (peak, item, x.nbytes)


# ------------------------------------------------------------------------------------------ slices and claims


@pytest.mark.parametrize("compress", [False, True])
def test_nifti2_header_claiming_10_to_12_slices_is_one_error(tmp_path, compress):
    hdr = nifti_header((8, 8, 10**12))
    assert len(hdr) == 544
    p = tmp_path / ("claim.nii.gz" if compress else "claim.nii")
    p.write_bytes(gz(hdr) if compress else hdr)
    for call in (lambda: count_slices(p), lambda: next(iter_items(p)), lambda: read_image(p, slice_index=0)):
        with pytest.raises(ImageReadError) as ei:
            call()
        assert str(p) in str(ei.value) and "header claims 1000000000000 slices" in ei.value.reason


def test_nifti_claiming_more_voxels_than_the_file_holds(tmp_path):
    p = tmp_path / "short.nii"
    p.write_bytes(nifti_header((8, 8, 100), np.int16, version=1) + b"\0" * (8 * 8 * 2 * 10))
    reason = _err(p, slice_index=0)
    assert "voxel data of shape (8, 8, 100) (int16) = 13152 bytes but the file can hold at most 1632" in (
        reason
    )
    gz_claim = tmp_path / "big.nii.gz"
    gz_claim.write_bytes(gz(nifti_header((4096, 4096, 4096), np.float64)))
    assert "once inflated (deflate expands at most 1032 times)" in _err(gz_claim, slice_index=0)


def test_slice_cap_boundary(tmp_path):
    at = tmp_path / "at.nii"
    nib.save(nib.Nifti1Image(np.zeros((2, 2, MAX_SLICES), np.uint8), np.eye(4)), at)
    assert count_slices(at) == MAX_SLICES
    over = tmp_path / "over.nii"
    nib.save(nib.Nifti1Image(np.zeros((2, 2, MAX_SLICES + 1), np.uint8), np.eye(4)), over)
    with pytest.raises(ImageReadError, match=f"claims {MAX_SLICES + 1} slices, more than the limit"):
        count_slices(over)


def test_dicom_frame_claims(tmp_path):
    huge = write_dicom(tmp_path / "huge.dcm", np.zeros((8, 8), np.uint16), frames="1000000000000")
    for call in (lambda: count_slices(huge), lambda: next(iter_items(huge)), lambda: read_image(huge)):
        with pytest.raises(ImageReadError, match="header claims 1000000000000 frames, more than the limit"):
            call()
    short = write_dicom(tmp_path / "short.dcm", np.zeros((2, 8, 8), np.uint16), frames=50)
    with pytest.raises(ImageReadError, match=r"50 frame\(s\) of 8x8x1 at 16 bits = 6400 bytes but the file "
                                             r"can hold at most 256"):  # fmt: skip
        count_slices(short)


# ------------------------------------------------------------------------------------------ degenerate images


@pytest.mark.parametrize("size", [(1, 1), (1, 40), (40, 1)])
def test_images_below_two_pixels_a_side_are_refused(tmp_path, size):
    for ext in ("png", "jpg", "tif"):
        p = tmp_path / f"tiny.{ext}"
        Image.fromarray(np.full(size, 128, np.uint8)).save(p)
        assert f"image too small: {size[0]}x{size[1]} (each side must be at least 2 px)" in _err(p)
    Image.fromarray(np.full((2, 2), 128, np.uint8)).save(tmp_path / "two.png")
    assert read_image(tmp_path / "two.png")[0].shape == (1, 2, 2)


@pytest.mark.parametrize(("center", "width"), [("nan", 4), ("inf", 4), (40, "nan"), (40, 0), (40, "-inf")])
def test_dicom_window_that_cannot_be_used_is_an_error_in_dtype_mode(tmp_path, center, width):
    p = write_dicom(tmp_path / "w.dcm", RNG.integers(0, 4096, (H, W), dtype=np.uint16), center=center,
                    width=width)  # fmt: skip
    assert "DICOM VOI window cannot be used" in _err(p) and "WindowCenter=" in _err(p)
    x, _ = read_image(p, intensity=PERCENTILE)  # modes that do not use the window ignore it
    assert np.isfinite(x).all() and x.max() == 1.0


@pytest.mark.parametrize("slope", ["nan", "inf"])
def test_dicom_non_finite_rescale_is_an_error(tmp_path, slope):
    p = write_dicom(tmp_path / "r.dcm", np.ones((H, W), np.uint16), slope=slope, intercept=0)
    assert "DICOM rescale is not finite" in _err(p, intensity=PERCENTILE)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_voxels_are_an_error(tmp_path, bad):
    vol = RNG.random((H, W, 2)).astype(np.float32)
    vol[1, 2, 1] = bad
    nib.save(nib.Nifti1Image(vol, np.eye(4)), tmp_path / "v.nii")
    assert _err(tmp_path / "v.nii", slice_index=1) == "contains NaN/Inf pixel values"
    assert read_image(tmp_path / "v.nii", slice_index=0)[0].shape == (1, H, W)  # the clean slice reads


@pytest.mark.parametrize(("dtype", "big"), [("float32", 3e38), ("float64", 1.7e308), ("float64", 1e200)])
def test_extreme_finite_values_normalise_without_overflow(tmp_path, dtype, big):
    """Found by fuzzing: a min-max window over +-3e38 overflowed float32 into NaN."""
    a = (np.linspace(-1, 1, H * W) * big).astype(dtype).reshape(H, W)
    tifffile.imwrite(tmp_path / "wide.tif", a)
    x, _ = read_image(tmp_path / "wide.tif")
    np.testing.assert_allclose(x[0], (a / big + 1) / 2, atol=1e-6)
    vol = nib.Nifti1Image(np.arange(H * W * 2, dtype=np.int16).reshape(H, W, 2), np.eye(4))
    vol.header.set_slope_inter(1e300, 0)  # scaled voxels far beyond float32
    nib.save(vol, tmp_path / "scaled.nii")
    x, _ = read_image(tmp_path / "scaled.nii", slice_index=1)
    assert np.isfinite(x).all() and x.min() == 0.0 and x.max() == 1.0


def test_empty_volume_is_an_error(tmp_path):
    (tmp_path / "empty.nii").write_bytes(nifti_header((8, 8, 0)))
    with pytest.raises(ImageReadError, match="empty image: 0 slices"):
        count_slices(tmp_path / "empty.nii")


def test_png_chunk_claiming_4_gb_is_refused_at_once(files):
    data = bytearray(files["gray16.png"].read_bytes())
    data[33:37] = b"\xff\xff\xff\xff"  # the first chunk after IHDR claims 4 GB
    t0 = time.perf_counter()
    with pytest.raises(ImageReadError, match="corrupt or truncated PNG: chunk .* claims 4294967295 bytes"):
        read_image_bytes(bytes(data), "long.png")
    assert time.perf_counter() - t0 < 1.0


@pytest.mark.timeout(60)
def test_tiff_directory_loops_and_endless_chains_are_refused():
    t0 = time.perf_counter()
    with pytest.raises(ImageReadError, match="chain of image directories loops at byte"):
        read_image_bytes(tiff_ifd_loop(150), "loop.tif")  # tifffile alone walks this 1.3 KB file ~forever
    with pytest.raises(ImageReadError, match=f"more than {MAX_IFDS} image directories"):
        read_image_bytes(tiff_ifd_loop(MAX_IFDS + 10), "long.tif")
    assert time.perf_counter() - t0 < 10


def test_bytes_input_is_checked_the_same(files):
    data = files["rgb8.png"].read_bytes()
    with pytest.raises(ImageReadError, match="max_bytes=10"):
        read_image_bytes(data, "up.png", max_bytes=10)
    with pytest.raises(ImageReadError, match="image too small"):
        read_image_bytes(png_zeros(1, 1), "dot.png")
