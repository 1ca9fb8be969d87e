"""data.readers: every format written for real into tmp_path, every bad input, every normalisation mode."""

from __future__ import annotations

import pickle
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import tifffile
from image_files import GRAY8, GRAY16, RGB8, RGB16, RNG, H, W, sample_files, write_dicom
from PIL import Image

from imganom.config import IntensityConfig
from imganom.data.readers import (
    IMAGE_EXTENSIONS,
    ImageMeta,
    ImageReadError,
    count_slices,
    iter_items,
    normalize_intensity,
    read_image,
    read_image_bytes,
    split_item_id,
    to_uint8_preview,
)

PERCENTILE = IntensityConfig(mode="percentile", low=0, high=100)
FORMAT_FILES = ["rgb.jpg", "rgb8.png", "gray16.png", "rgb.bmp", "u16.tif", "ct.dcm", "vol.nii.gz"]


def chw(hwc: np.ndarray, scale: float) -> np.ndarray:
    a = hwc[..., None] if hwc.ndim == 2 else hwc
    return (a.astype(np.float64) / scale).transpose(2, 0, 1)


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    """One small valid file per format variant."""
    return sample_files(tmp_path)


# ---------------------------------------------------------------------------------------------- formats


def test_png_8bit_gray_rgb_exact(files):
    x, meta = read_image(files["gray8.png"])
    assert x.dtype == np.float32 and x.flags.c_contiguous and x.shape == (1, H, W)
    np.testing.assert_allclose(x, chw(GRAY8, 255), atol=1e-6)
    assert meta == ImageMeta(str(files["gray8.png"]), (H, W), "uint8", 1, "png", None)
    x, meta = read_image(files["rgb8.png"])
    np.testing.assert_allclose(x, chw(RGB8, 255), atol=1e-6)
    assert (meta.channels, meta.format) == (3, "png")


def test_png_16bit_keeps_all_bits(files):
    x, meta = read_image(files["gray16.png"])
    assert meta.dtype == "uint16" and meta.channels == 1
    np.testing.assert_allclose(x, chw(GRAY16, 65535), atol=1e-7)  # 8-bit would be off by up to 1/510
    x, meta = read_image(files["rgb16.png"])
    assert meta.dtype == "uint16" and meta.channels == 3
    np.testing.assert_allclose(x, chw(RGB16, 65535), atol=1e-7)  # RGB order, not BGR


def test_rgba_keep_drop_alpha_and_luminance(files):
    x4, meta = read_image(files["rgba8.png"])
    assert x4.shape == (4, H, W) and meta.channels == 4
    x3, _ = read_image(files["rgba8.png"], channels=3)
    np.testing.assert_allclose(x3, chw(RGB8, 255), atol=1e-6)
    x1, _ = read_image(files["rgba8.png"], channels=1)
    luma = (RGB8 @ np.array([0.299, 0.587, 0.114])) / 255
    np.testing.assert_allclose(x1[0], luma, atol=1e-5)


def test_gray_to_rgb_replicates(files):
    x, meta = read_image(files["gray8.png"], channels=3)
    assert x.shape == (3, H, W) and meta.channels == 1
    assert np.array_equal(x[0], x[1]) and np.array_equal(x[0], x[2])


def test_jpeg_and_bmp(files):
    x, meta = read_image(files["rgb.jpg"])
    assert meta.format == "jpeg" and x.shape == (3, H, W)
    np.testing.assert_allclose(x, chw(np.asarray(Image.open(files["rgb.jpg"])), 255), atol=1e-6)
    x, meta = read_image(files["rgb.bmp"])
    assert meta.format == "bmp"
    np.testing.assert_allclose(x, chw(RGB8, 255), atol=1e-6)


def test_magic_bytes_beat_extension(tmp_path, files):
    p = tmp_path / "actually_png.jpg"
    p.write_bytes(files["rgb8.png"].read_bytes())
    x, meta = read_image(p)
    assert meta.format == "png"
    np.testing.assert_allclose(x, chw(RGB8, 255), atol=1e-6)


@pytest.mark.parametrize("dtype", ["uint8", "uint16", "float32"])
@pytest.mark.parametrize("layout", ["hw", "hwc3", "hwc5", "chw5"])
def test_tiff_dtypes_and_layouts(tmp_path, dtype, layout):
    c = {"hw": 1, "hwc3": 3, "hwc5": 5, "chw5": 5}[layout]
    ref = RNG.random((H, W, c))  # in [0, 1)
    if dtype == "float32":
        stored, scale = ref.astype(np.float32), 1.0
    else:
        scale = float(np.iinfo(dtype).max)
        stored = np.round(ref * scale).astype(dtype)
    data = stored[..., 0] if layout == "hw" else stored
    kw = {}
    if layout == "hwc5":
        kw = dict(photometric="minisblack", planarconfig="contig")
    elif layout == "chw5":
        data = np.ascontiguousarray(stored.transpose(2, 0, 1))  # planar: written as 5 pages
    p = tmp_path / f"{dtype}_{layout}.tif"
    tifffile.imwrite(p, data, **kw)
    x, meta = read_image(p)
    assert meta == ImageMeta(str(p), (H, W), dtype, c, "tiff")
    np.testing.assert_allclose(x, chw(stored, scale), atol=1e-6)


def test_tiff_hwc_written_as_pages_is_read_as_channels(tmp_path):
    a = RNG.integers(0, 256, (H + 20, W, 5), dtype=np.uint8)  # tifffile's default: 32 pages of W x 5
    tifffile.imwrite(tmp_path / "p.tif", a)
    x, meta = read_image(tmp_path / "p.tif")
    assert meta.original_size == (H + 20, W) and meta.channels == 5
    np.testing.assert_allclose(x, chw(a, 255), atol=1e-6)


def test_tiff_float_out_of_range_is_min_max(tmp_path):
    a = np.linspace(-3, 5, H * W, dtype=np.float32).reshape(H, W)
    tifffile.imwrite(tmp_path / "f.tif", a)
    x, _ = read_image(tmp_path / "f.tif")
    assert x.min() == 0.0 and x.max() == 1.0
    np.testing.assert_allclose(x[0], (a + 3) / 8, atol=1e-6)


def test_dicom_rescale_window_and_monochrome1(tmp_path):
    raw = np.arange(H * W, dtype=np.uint16).reshape(H, W) * 10  # 0 .. 1910
    # HU = 2 * raw - 1000 -> -1000 .. 2820; window [c - w/2, c + w/2] ~ [0, 1000]
    p = write_dicom(tmp_path / "w.dcm", raw, slope=2, intercept=-1000, center=500.5, width=1001)
    x, meta = read_image(p)
    assert meta == ImageMeta(str(p), (H, W), "uint16", 1, "dicom")
    hu = raw * 2.0 - 1000
    np.testing.assert_allclose(x[0], np.clip(hu / 1000, 0, 1), atol=1e-5)
    # fixed window works in rescaled units (HU), not stored values
    x, _ = read_image(p, intensity=IntensityConfig(mode="fixed", low=-1000, high=0))
    np.testing.assert_allclose(x[0], np.clip((hu + 1000) / 1000, 0, 1), atol=1e-5)
    inv = write_dicom(tmp_path / "m1.dcm", raw, photometric="MONOCHROME1", slope=2, intercept=-1000,
                      center=500.5, width=1001)
    xi, _ = read_image(inv)
    np.testing.assert_allclose(xi[0], 1 - np.clip(hu / 1000, 0, 1), atol=1e-5)


def test_dicom_without_window_uses_bits_stored(tmp_path):
    raw = np.full((H, W), 4095, np.uint16)
    raw[0, 0] = 0
    x, meta = read_image(write_dicom(tmp_path / "12bit.dcm", raw, bits_stored=12))
    assert meta.dtype == "uint16" and x[0, 1, 1] == 1.0 and x[0, 0, 0] == 0.0  # /4095, not /65535


def test_dicom_signed_min_max_and_no_preamble(tmp_path):
    raw = np.linspace(-500, 1500, H * W).astype(np.int16).reshape(H, W)
    p = write_dicom(tmp_path / "s.dcm", raw, preamble=False)
    x, meta = read_image(p)
    assert meta.dtype == "int16" and meta.format == "dicom"
    np.testing.assert_allclose(x[0], (raw + 500.0) / 2000, atol=1e-5)


def test_dicom_multiframe_slices(tmp_path):
    frames = RNG.integers(0, 65536, (3, H, W), dtype=np.uint16)
    p = write_dicom(tmp_path / "mf.dcm", frames)
    assert count_slices(p) == 3
    items = list(iter_items(p))
    assert [s for s, _, _ in items] == ["#slice=0000", "#slice=0001", "#slice=0002"]
    np.testing.assert_allclose(items[2][1][0], frames[2] / 65535, atol=1e-6)
    assert items[2][2].slice == 2


def test_nifti_2d_and_3d_volume(tmp_path):
    img2 = RNG.random((H, W)).astype(np.float32)
    nib.save(nib.Nifti1Image(img2, np.eye(4)), tmp_path / "flat.nii")
    x, meta = read_image(tmp_path / "flat.nii")
    assert meta == ImageMeta(str(tmp_path / "flat.nii"), (H, W), "float32", 1, "nifti")
    np.testing.assert_allclose(x[0], img2, atol=1e-6)
    assert count_slices(tmp_path / "flat.nii") == 1
    assert [s for s, _, _ in iter_items(tmp_path / "flat.nii")] == [""]

    vol = RNG.integers(0, 1000, (H, W, 5)).astype(np.int16)
    p = tmp_path / "vol.nii.gz"
    nib.save(nib.Nifti1Image(vol, np.eye(4)), p)
    assert count_slices(p) == 5
    items = list(iter_items(p))
    assert [s for s, _, _ in items] == [f"#slice={k:04d}" for k in range(5)]
    assert [m.slice for _, _, m in items] == list(range(5))
    s3 = vol[:, :, 3].astype(np.float64)
    np.testing.assert_allclose(items[3][1][0], (s3 - s3.min()) / (s3.max() - s3.min()), atol=1e-6)
    x, meta = read_image(p, slice_index=3)
    np.testing.assert_array_equal(x, items[3][1])
    assert (meta.slice, meta.dtype) == (3, "int16")
    assert [s for s, _, _ in iter_items(p, slice_index=1)] == ["#slice=0001"]
    with pytest.raises(ImageReadError, match="volume with 5 slices"):
        read_image(p)
    with pytest.raises(ImageReadError, match="slice_index 9 out of range"):
        read_image(p, slice_index=9)


def test_nifti_4d_small_last_axis_is_channels(tmp_path):
    vol = RNG.integers(0, 256, (H, W, 2, 3)).astype(np.uint8)
    nib.save(nib.Nifti1Image(vol, np.eye(4)), tmp_path / "c.nii")
    x, meta = read_image(tmp_path / "c.nii", slice_index=1)
    assert x.shape == (3, H, W) and meta.channels == 3
    np.testing.assert_allclose(x, chw(vol[:, :, 1], 255), atol=1e-6)


def test_read_image_bytes_matches_read_image(files):
    for name, p in files.items():
        kw = {"slice_index": 1} if name.endswith(".nii.gz") else {}
        a, ma = read_image(p, **kw)
        b, mb = read_image_bytes(p.read_bytes(), name=str(p), **kw)
        np.testing.assert_array_equal(a, b, err_msg=name)
        assert ma == mb, name
    _, m = read_image_bytes(files["rgb8.png"].read_bytes())  # no name: detected from content
    assert m.path == "<upload>" and m.format == "png"


# ---------------------------------------------------------------------------------------------- intensity


def test_normalize_dtype_mode():
    cfg = IntensityConfig()
    u8 = np.array([0, 51, 255], np.uint8)
    np.testing.assert_allclose(normalize_intensity(u8, cfg, u8.dtype), [0, 0.2, 1], atol=1e-7)
    u16 = np.array([0, 65535], np.uint16)
    np.testing.assert_allclose(normalize_intensity(u16, cfg, u16.dtype), [0, 1])
    f_in = np.array([0.2, 0.7], np.float32)
    np.testing.assert_array_equal(normalize_intensity(f_in, cfg, f_in.dtype), f_in)  # already in [0, 1]
    f_out = np.array([-1.0, 0.0, 3.0], np.float32)
    np.testing.assert_allclose(normalize_intensity(f_out, cfg, f_out.dtype), [0, 0.25, 1])
    i16 = np.array([-100, 0, 100], np.int16)
    np.testing.assert_allclose(normalize_intensity(i16, cfg, i16.dtype), [0, 0.5, 1])
    assert normalize_intensity(u8, cfg, u8.dtype).dtype == np.float32


def test_normalize_percentile_and_fixed():
    a = np.arange(101, dtype=np.uint16)
    out = normalize_intensity(a, IntensityConfig(mode="percentile", low=10, high=90), a.dtype)
    assert out[10] == 0 and out[90] == 1 and out[0] == 0 and out[100] == 1
    assert out[50] == pytest.approx(0.5)
    out = normalize_intensity(a, IntensityConfig(mode="fixed", low=20, high=60), a.dtype)
    assert out[20] == 0 and out[40] == pytest.approx(0.5) and out[60] == 1 and out[100] == 1


def test_percentile_is_per_image_over_all_channels():
    a = np.zeros((2, 4, 4), np.uint8)
    a[1] = 200  # a dim channel stays dim relative to a bright one
    out = normalize_intensity(a, PERCENTILE, a.dtype)
    assert out[0].max() == 0 and out[1].min() == 1


@pytest.mark.parametrize("mode", ["dtype", "percentile", "fixed"])
@pytest.mark.parametrize("dtype", ["uint8", "int16", "float32"])
def test_flat_images_are_zero_not_nan(mode, dtype):
    a = np.full((4, 4), 7, dtype=dtype)
    cfg = IntensityConfig(mode=mode, low=10 if mode == "fixed" else 1, high=20 if mode == "fixed" else 99)
    out = normalize_intensity(a, cfg, a.dtype)
    assert np.isfinite(out).all() and out.min() >= 0 and out.max() <= 1
    if mode != "dtype" or dtype != "uint8":
        assert (out == 0).all()


def test_percentile_mode_through_reader(files):
    x, _ = read_image(files["gray8.png"], intensity=PERCENTILE)
    g = GRAY8.astype(np.float64)
    np.testing.assert_allclose(x[0], (g - g.min()) / (g.max() - g.min()), atol=1e-6)


def test_normalize_rejects_nan():
    with pytest.raises(ValueError, match="NaN/Inf"):
        normalize_intensity(np.array([0.0, np.nan]), IntensityConfig(), np.dtype(np.float64))


# ---------------------------------------------------------------------------------------------- bad inputs


def _err(path, **kw) -> str:
    with pytest.raises(ImageReadError) as ei:
        read_image(path, **kw)
    assert ei.value.path == str(path)
    assert str(ei.value) == f"{path}: {ei.value.reason}"
    return ei.value.reason


def test_missing_directory_empty(tmp_path):
    assert "not found" in _err(tmp_path / "nope.png")
    assert "directory" in _err(tmp_path)
    (tmp_path / "zero.png").write_bytes(b"")
    assert "empty file (0 bytes)" in _err(tmp_path / "zero.png")
    with pytest.raises(ImageReadError, match="empty data"):
        read_image_bytes(b"", name="up.png")


@pytest.mark.parametrize("name", FORMAT_FILES)
def test_truncated_files(tmp_path, files, name):
    data = files[name].read_bytes()
    p = tmp_path / f"cut_{name}"
    p.write_bytes(data[: len(data) * 2 // 3])
    kw = {"slice_index": 2} if name.endswith(".nii.gz") else {}
    reason = _err(p, **kw)
    assert "cannot decode" in reason or "truncated" in reason or "no pixel data" in reason


def test_text_file_named_png_and_unsupported_extension(tmp_path):
    (tmp_path / "notes.png").write_text("hello, I am not an image\n" * 30)
    assert "not a PNG image (content does not match extension '.png')" in _err(tmp_path / "notes.png")
    (tmp_path / "notes.nii").write_text("hello\n" * 100)
    assert "not a NIfTI image" in _err(tmp_path / "notes.nii")
    (tmp_path / "notes.xyz").write_text("hello")
    assert "unsupported file type '.xyz'" in _err(tmp_path / "notes.xyz")
    (tmp_path / "notes.dcm").write_text("hello\n" * 100)
    assert "DICOM" in _err(tmp_path / "notes.dcm")


@pytest.mark.parametrize("junk", [b"\x89PNG\r\n\x1a\n" + b"\0" * 40, b"\xff\xd8\xff" + b"x" * 40,
                                  b"II*\x00" + b"\1" * 40, b"\x1f\x8b" + b"\0" * 40,
                                  b"\0" * 128 + b"DICM" + b"\xff" * 40])
def test_garbage_behind_valid_magic_is_wrapped(tmp_path, junk):
    (tmp_path / "junk.bin").write_bytes(junk)
    assert _err(tmp_path / "junk.bin")


def test_wrong_channel_count(tmp_path, files):
    a = RNG.integers(0, 256, (H, W, 5), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "five.tif", a, photometric="minisblack", planarconfig="contig")
    assert "has 5 channels, model expects 3" in _err(tmp_path / "five.tif", channels=3)
    assert "has 1 channels, model expects 3" in _err(files["gray8.png"], channels=3, channel_policy="strict")
    assert "has 3 channels, model expects 1" in _err(files["rgb8.png"], channels=1, channel_policy="strict")
    assert "has 3 channels, model expects 2" in _err(files["rgb8.png"], channels=2)
    with pytest.raises(ValueError, match="channel_policy"):
        read_image(files["rgb8.png"], channel_policy="maybe")


@pytest.mark.parametrize("name", FORMAT_FILES)
def test_max_pixels_guard(files, name):
    reason = _err(files[name], max_pixels=H * W - 1, slice_index=0 if name.endswith(".nii.gz") else None)
    assert f"{H}x{W}" in reason and "max_pixels" in reason
    read_image(files[name], max_pixels=H * W, slice_index=0 if name.endswith(".nii.gz") else None)


def test_pillow_decompression_bomb_is_wrapped(files, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10)
    assert "DecompressionBomb" in _err(files["rgb.jpg"])


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nan_inf_float_tiff(tmp_path, bad):
    a = RNG.random((H, W)).astype(np.float32)
    a[3, 4] = bad
    tifffile.imwrite(tmp_path / "nan.tif", a)
    assert _err(tmp_path / "nan.tif") == "contains NaN/Inf pixel values"


def test_zero_size_tiff(tmp_path):
    p = tmp_path / "empty.tif"
    tifffile.imwrite(p, np.zeros((0, 5), np.uint8))
    assert _err(p)


# ---------------------------------------------------------------------------------------------- helpers


def test_split_item_id():
    assert split_item_id("a/b.nii.gz#slice=0003") == ("a/b.nii.gz", 3)
    assert split_item_id("a/b.png") == ("a/b.png", None)
    assert split_item_id("odd#name.png") == ("odd#name.png", None)
    assert split_item_id("v.nii#slice=12") == ("v.nii", 12)


def test_to_uint8_preview():
    g = np.linspace(0, 1, 6, dtype=np.float32).reshape(1, 2, 3)
    out = to_uint8_preview(g)
    assert out.shape == (2, 3, 3) and out.dtype == np.uint8
    assert out[0, 0].tolist() == [0, 0, 0] and out[1, 2].tolist() == [255, 255, 255]
    five = np.zeros((5, 2, 2), np.float32)
    five[1] = 1.0
    five[4] = 1.0
    assert to_uint8_preview(five)[0, 0].tolist() == [0, 255, 0]
    assert to_uint8_preview(np.full((2, 2), np.nan, np.float32)).max() == 0


def test_error_type_and_pickle():
    e = ImageReadError(Path("x/y.png"), "broken")
    assert isinstance(e, ValueError) and str(e) == f"{Path('x/y.png')}: broken"
    e2 = pickle.loads(pickle.dumps(e))
    assert (e2.path, e2.reason, str(e2)) == (e.path, e.reason, str(e))


def test_extensions_constant():
    assert IMAGE_EXTENSIONS == (
        ".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".dcm", ".dicom", ".nii", ".nii.gz"
    )
