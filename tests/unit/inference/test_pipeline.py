"""The device fast path (``inference.pipeline``, ``inference.compiled``) and its use by ``Inspector``.

CPU tests check everything that does not need a GPU: torch morphology vs OpenCV (bit-exact), device-side
scores vs numpy, OOM halving with an injected OOM, the prefetcher and pipeline ordering, and the
``maps="ng"``/``device_postprocess`` Inspector paths against the plain host path. ``TestCUDA`` runs only on
a CUDA machine: bf16 vs fp32 maps and verdicts on the demo data, real OOM halving, compiled parity.
"""

from __future__ import annotations

import logging
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from imganom.config import PostprocessConfig
from imganom.inference.compiled import keep_output_layer_fp32, pad_batch
from imganom.inference.inspector import Inspector
from imganom.inference.pipeline import (
    AdaptiveBatch,
    HostCopy,
    Prefetcher,
    is_oom,
    pipelined,
    run_adaptive,
)
from imganom.ops.device_post import binarize_t, ellipse_rows, image_scores_t
from imganom.ops.postprocess import binarize, image_score, structuring_element
from imganom.workflows.demo import DATA, WEIGHTS

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _random_map(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Smooth random map: blobs and speckle, so opening and closing both change something."""
    m = cv2.GaussianBlur(rng.random((h, w)).astype(np.float32), (0, 0), float(rng.uniform(0.5, 2.0)))
    return m + 0.05 * rng.random((h, w)).astype(np.float32)


@pytest.fixture(scope="module")
def demo_test_paths(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """A few images of the demo's synthetic test set (same generator settings as the demo model's data)."""
    from imganom.data.discovery import find_images
    from imganom.data.synth import make_dataset

    root = tmp_path_factory.mktemp("gpu") / "demo"
    kw = {k: v for k, v in DATA.items() if not k.startswith("n_")}
    make_dataset(root, n_train=0, n_test_good=6, n_test_defect=10, **kw)
    return find_images(root / "test")


# ------------------------------------------------------------------------------------------- morphology


def test_ellipse_rows_are_opencvs_element() -> None:
    assert ellipse_rows(0) == (0,)
    assert ellipse_rows(1) == (0, 1, 0)  # cv2's radius-1 ellipse is the 3x3 cross
    for r in range(4):
        se = structuring_element(r)
        rebuilt = np.zeros_like(se)
        for i, a in enumerate(ellipse_rows(r)):
            rebuilt[i, r - a : r + a + 1] = 1
        assert np.array_equal(rebuilt, se)


@pytest.mark.parametrize("open_r", [0, 1, 2])
@pytest.mark.parametrize("close_r", [0, 1, 2, 3])
def test_binarize_t_matches_opencv_exactly(open_r: int, close_r: int) -> None:
    rng = np.random.default_rng(open_r * 10 + close_r)
    cfg = PostprocessConfig(open_radius=open_r, close_radius=close_r)
    for trial in range(6):
        h, w = (int(v) for v in rng.integers(4, 48, 2))
        maps = np.stack([_random_map(rng, h, w) for _ in range(3)])
        thr = float(np.quantile(maps, rng.uniform(0.4, 0.9)))
        roi = rng.random((h, w)) > 0.15 if trial % 2 else None
        got = binarize_t(torch.from_numpy(maps), thr, cfg, None if roi is None else torch.from_numpy(roi))
        assert got.dtype == torch.uint8 and got.shape == (3, h, w)
        for m, g in zip(maps, got.numpy()):
            assert np.array_equal(g, binarize(m, thr, cfg, roi)), (h, w, trial)


def test_binarize_t_morphology_is_not_trivial() -> None:
    """Guard for the test above: opening and closing really change these masks."""
    rng = np.random.default_rng(1)
    m = _random_map(rng, 40, 40)
    thr = float(np.quantile(m, 0.7))
    plain = binarize(m, thr, PostprocessConfig(open_radius=0, close_radius=0))
    assert not np.array_equal(plain, binarize(m, thr, PostprocessConfig(open_radius=1, close_radius=0)))
    assert not np.array_equal(plain, binarize(m, thr, PostprocessConfig(open_radius=0, close_radius=2)))


@pytest.mark.parametrize("score", ["max", "topk_mean"])
def test_image_scores_t_matches_numpy(score: str) -> None:
    rng = np.random.default_rng(2)
    cfg = PostprocessConfig(score=score, topk=0.03)
    maps = np.stack([_random_map(rng, 31, 45) for _ in range(4)])
    roi = rng.random((31, 45)) > 0.5
    for r in (None, roi):
        got = image_scores_t(torch.from_numpy(maps), cfg, None if r is None else torch.from_numpy(r))
        assert got.dtype == torch.float64
        want = [image_score(m, cfg, r) for m in maps]
        if score == "max":
            assert got.tolist() == want
        else:
            np.testing.assert_allclose(got.numpy(), want, rtol=1e-12)
    with pytest.raises(ValueError, match="ROI is empty"):
        image_scores_t(torch.from_numpy(maps), cfg, torch.zeros(31, 45, dtype=torch.bool))


# ------------------------------------------------------------------------------------------ OOM halving


def _fake_oom_fn(limit: int, calls: list[int], error: type[Exception] = torch.OutOfMemoryError):
    def fn(chunk: list[int]) -> list[int]:
        calls.append(len(chunk))
        if len(chunk) > limit:
            raise error("CUDA out of memory. Tried to allocate 2.00 GiB")
        return [2 * v for v in chunk]

    return fn


def test_run_adaptive_halves_on_oom_and_remembers(caplog: pytest.LogCaptureFixture) -> None:
    calls: list[int] = []
    state = AdaptiveBatch()
    with caplog.at_level(logging.WARNING, logger="imganom.inference.pipeline"):
        out = run_adaptive(_fake_oom_fn(3, calls), list(range(11)), 8, state)
    assert out == [2 * v for v in range(11)]
    assert calls == [8, 4, 2, 2, 2, 2, 2, 1]
    assert state.limit == 2
    assert sum("out of memory" in r.message for r in caplog.records) == 2
    calls.clear()
    assert run_adaptive(_fake_oom_fn(3, calls), list(range(5)), 8, state) == [0, 2, 4, 6, 8]
    assert calls == [2, 2, 1]  # starts at the remembered size: no new failures


def test_run_adaptive_plain_runtime_error_oom_message() -> None:
    calls: list[int] = []
    assert run_adaptive(_fake_oom_fn(1, calls, RuntimeError), [1, 2, 3], 4) == [2, 4, 6]
    assert calls == [3, 1, 1, 1]  # 3 items: the first chunk is 3, then halves to 1


def test_run_adaptive_gives_up_and_passes_other_errors() -> None:
    with pytest.raises(torch.OutOfMemoryError):
        run_adaptive(_fake_oom_fn(0, []), [1, 2, 3], 4)

    def broken(chunk: list[int]) -> list[int]:
        raise RuntimeError("shape mismatch")

    calls: list[int] = []
    with pytest.raises(RuntimeError, match="shape mismatch"):
        run_adaptive(lambda c: (calls.append(len(c)), broken(c))[1], [1, 2, 3, 4], 4)
    assert calls == [4]  # no retry for a non-OOM error
    assert is_oom(RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 9 GB"))
    assert not is_oom(ValueError("out of memory"))


def test_inspector_halves_batch_on_injected_oom(
    demo_test_paths: list[Path], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    ref = Inspector.load(WEIGHTS, device="cpu")
    want = ref.predict(demo_test_paths)
    insp = Inspector.load(WEIGHTS, device="cpu")
    real, sizes = insp.model_maps_scored, []

    def model_maps_scored(views: torch.Tensor):
        sizes.append(len(views))
        if len(views) > 3:
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return real(views)

    monkeypatch.setattr(insp, "model_maps_scored", model_maps_scored)
    with caplog.at_level(logging.WARNING, logger="imganom.inference.pipeline"):
        got = insp.predict(demo_test_paths)
    assert sizes[:3] == [16, 8, 4] and max(sizes[3:]) <= 2
    assert insp.adaptive.limit == 2
    # smaller batches may pick other conv kernels: last-digit differences only, same verdicts
    np.testing.assert_allclose([r.score for r in got], [r.score for r in want], rtol=1e-5)
    assert [r.verdict for r in got] == [r.verdict for r in want]


def test_pad_batch_keeps_rows_and_layout() -> None:
    x = torch.rand(3, 4, 5, 6).contiguous(memory_format=torch.channels_last)
    p = pad_batch(x, 8)
    assert p.shape == (8, 4, 5, 6) and p.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(p[:3], x) and not p[3:].any()
    assert pad_batch(x, 3) is x and pad_batch(x, 2) is x


def test_output_layer_fp32_under_autocast_only() -> None:
    from imganom.formats.modelfile import load_model
    from imganom.models.vae import ConvVAE

    model, _, _ = load_model(WEIGHTS)
    plain = ConvVAE(model.cfg, model.in_channels, model.size).eval()
    plain.load_state_dict(model.state_dict())
    assert keep_output_layer_fp32(model) and keep_output_layer_fp32(model)  # idempotent
    assert list(model.state_dict()) == list(plain.state_dict())
    x = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        assert torch.equal(model.decode(model.encode(x)[0]), plain.decode(plain.encode(x)[0]))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert model.decode(model.encode(x)[0]).dtype == torch.float32
            assert plain.decode(plain.encode(x)[0]).dtype == torch.bfloat16


# ------------------------------------------------------------------------------ prefetcher and pipeline


def test_prefetcher_on_cpu_is_a_plain_ordered_iterator() -> None:
    src = [(i, torch.full((2, 3), float(i)), {"m": torch.arange(i + 1)}, "tag") for i in range(5)]
    got = list(Prefetcher(src, "cpu"))
    assert len(got) == 5
    for (i, t, d, s), (gi, gt, gd, gs) in zip(src, got):
        assert gi == i and gs == s
        assert torch.equal(gt, t) and torch.equal(gd["m"], d["m"])


def test_prefetcher_raises_source_error_after_earlier_items() -> None:
    def src():
        yield torch.zeros(1)
        yield torch.ones(1)
        raise ValueError("bad input")

    seen = []
    with pytest.raises(ValueError, match="bad input"):
        for t in Prefetcher(src(), "cpu"):
            seen.append(float(t))
    assert seen == [0.0, 1.0]


def test_pipelined_order_and_overlap() -> None:
    log: list[str] = []

    def launch(i: int) -> int:
        log.append(f"L{i}")
        return i

    def collect(i: int) -> int:
        log.append(f"C{i}")
        return 10 * i

    assert list(pipelined(range(3), launch, collect, depth=1)) == [0, 10, 20]
    assert log == ["L0", "L1", "C0", "L2", "C1", "C2"]  # batch k+1 is queued before k is finished
    log.clear()
    assert list(pipelined(range(2), launch, collect, depth=0)) == [0, 10]
    assert log == ["L0", "C0", "L1", "C1"]

    def failing():
        yield 0
        yield 1
        raise ValueError("decode failed")

    out = []
    with pytest.raises(ValueError, match="decode failed"):
        for r in pipelined(failing(), launch, collect, depth=1):
            out.append(r)
    assert out == [0, 10]  # what was launched is delivered before the error


def test_host_copy_on_cpu_returns_arrays() -> None:
    a, b = torch.arange(6.0).view(2, 3), torch.ones(4, dtype=torch.uint8)
    ha, hb = HostCopy([a, b]).wait()
    assert isinstance(ha, np.ndarray) and np.array_equal(ha, a.numpy()) and hb.dtype == np.uint8


# ---------------------------------------------------------------------------------------- Inspector paths


def test_maps_ng_returns_maps_only_for_ng(demo_test_paths: list[Path]) -> None:
    ref = Inspector.load(WEIGHTS, device="cpu").predict(demo_test_paths)
    ng = Inspector.load(WEIGHTS, device="cpu", maps="ng").predict(demo_test_paths)
    none = Inspector.load(WEIGHTS, device="cpu", maps="none").predict(demo_test_paths)
    verdicts = [r.is_anomalous for r in ref]
    assert 0 < sum(verdicts) < len(verdicts)  # both kinds present, or the test proves little
    for a, b, c in zip(ref, ng, none):
        assert a.score == b.score == c.score and a.is_anomalous == b.is_anomalous == c.is_anomalous
        assert a.norm_score == b.norm_score
        assert b.to_dict()["size"] == c.to_dict()["size"] == list(a.anomaly_map.shape)
        assert c.anomaly_map is None and c.mask is None and c.regions == []
        if a.is_anomalous:
            assert np.array_equal(b.anomaly_map, a.anomaly_map) and np.array_equal(b.mask, a.mask)
            assert [r.to_dict() for r in b.regions] == [r.to_dict() for r in a.regions]
        else:
            assert b.anomaly_map is None and b.mask is None and b.regions == []
    with pytest.raises(ValueError, match="maps must be"):
        Inspector.load(WEIGHTS, device="cpu", maps="some")


@pytest.mark.parametrize("resize", ["stretch", "letterbox", "tile"])
def test_device_postprocess_equals_host_path(demo_test_paths: list[Path], resize: str) -> None:
    """The torch post-processing (the CUDA path, run here on the CPU) gives the host path's results, for
    every geometry, mixed image sizes in one batch, a border ROI and the top-k score."""
    rng = np.random.default_rng(3)
    imgs = [cv2.imread(str(p), cv2.IMREAD_GRAYSCALE) for p in demo_test_paths[:6]]
    sizes = [(64, 64), (80, 96), (64, 64), (100, 70), (80, 96), (64, 64)]
    arrays = [cv2.resize(im, (w, h)) for im, (h, w) in zip(imgs, sizes)]
    arrays[2] = np.clip(arrays[2] + rng.integers(0, 60, arrays[2].shape), 0, 255).astype(np.uint8)
    out = []
    for post in (False, True):
        insp = Inspector.load(WEIGHTS, device="cpu", pixel_threshold=0.15)
        insp.cfg.preprocess.resize = resize
        insp.cfg.postprocess.border = 2
        insp.cfg.postprocess.score = "topk_mean"
        insp.cfg.postprocess.open_radius = 1
        insp.device_postprocess = post
        out.append(insp.predict(arrays))
    for a, b in zip(*out):
        assert a.anomaly_map.shape == b.anomaly_map.shape
        assert np.array_equal(a.anomaly_map, b.anomaly_map)
        assert b.score == pytest.approx(a.score, rel=1e-12) and a.is_anomalous == b.is_anomalous
        assert np.array_equal(a.mask, b.mask)
        assert [r.to_dict() for r in a.regions] == [r.to_dict() for r in b.regions]
    assert any(r.regions for r in out[0])


def test_predict_batch_yields_earlier_batches_before_a_bad_input(demo_test_paths: list[Path]) -> None:
    insp = Inspector.load(WEIGHTS, device="cpu")
    got = []
    with pytest.raises(ValueError):
        for r in insp.predict_batch([*demo_test_paths[:4], np.zeros((0, 5))], batch_size=2):
            got.append(r)
    assert len(got) == 4


def test_predict_stream_returns_errors_per_batch(demo_test_paths: list[Path]) -> None:
    insp = Inspector.load(WEIGHTS, device="cpu")
    good = [insp.load_input(p) for p in demo_test_paths[:2]]
    nan = np.full((1, 64, 64), np.nan, np.float32)
    batches = [
        ("a", [(str(p), c, m) for p, (c, m) in zip(demo_test_paths, good)], None),
        ("b", [("nan", nan, None)], None),
        ("c", [], None),
    ]
    out = list(insp.predict_stream(batches, errors="return"))
    assert [t for t, _ in out] == ["a", "b", "c"]
    assert len(out[0][1]) == 2 and isinstance(out[1][1], ValueError) and out[2][1] == []


def test_run_inspect_with_maps_ng_writes_outputs_for_ng_only(
    demo_test_paths: list[Path], tmp_path: Path
) -> None:
    from imganom.workflows.inspect import run_inspect

    insp = Inspector.load(WEIGHTS, device="cpu", maps="ng")
    rows, summary = run_inspect(insp, demo_test_paths[:8], tmp_path / "out", workers=0, report=False)
    assert len(rows) == 8 and all(r["status"] == "ok" for r in rows)
    ng = [r for r in rows if r["verdict"] == "NG"]
    assert ng and len(ng) < 8
    assert all(r["outputs"] for r in ng) and not any(r["outputs"] for r in rows if r["verdict"] == "OK")
    assert len(list((tmp_path / "out" / "masks").rglob("*.png"))) == len(ng)


# ----------------------------------------------------------------------------------------------- CUDA


@cuda
class TestCUDA:
    """Only on a GPU machine: mixed precision parity, real OOM halving, prefetch and compile."""

    def test_bf16_maps_and_verdicts_match_fp32_on_demo_data(self, tmp_path: Path) -> None:
        from imganom.data.discovery import find_images
        from imganom.ops.postprocess import postprocess
        from imganom.workflows.demo import make_demo_data

        paths = find_images(make_demo_data(tmp_path / "demo") / "test")
        fp32 = Inspector.load(WEIGHTS, device="cuda", precision="fp32").predict(paths)
        bf16 = Inspector.load(WEIGHTS, device="cuda", precision="bf16").predict(paths)
        err = max(
            np.abs(a.anomaly_map - b.anomaly_map).max() / a.anomaly_map.max() for a, b in zip(fp32, bf16)
        )
        assert err <= 1e-2  # max abs error relative to the map's max
        assert [r.verdict for r in bf16] == [r.verdict for r in fp32]
        cpu = Inspector.load(WEIGHTS, device="cpu").predict(paths)
        assert [r.verdict for r in fp32] == [r.verdict for r in cpu]
        pp = Inspector.load(WEIGHTS, device="cpu").cfg.postprocess
        for r in bf16:  # device scores, masks and regions == the host path on the same (CUDA) map
            mask, regions = postprocess(r.anomaly_map, r.thresholds["pixel"], pp)
            assert r.score == image_score(r.anomaly_map, pp)
            assert np.array_equal(mask, r.mask)
            assert [g.to_dict() for g in regions] == [g.to_dict() for g in r.regions]

    def test_oom_halving_with_a_huge_batch(self, caplog: pytest.LogCaptureFixture) -> None:
        from imganom.config import load_config
        from imganom.formats.modelfile import ModelMeta
        from imganom.models.vae import ConvVAE

        cfg = load_config(None, {"preprocess": {"size": [256, 256]}})
        model = ConvVAE(cfg.model, 1, (256, 256))
        meta = ModelMeta(config=cfg.model_dump(mode="json"), in_channels=1, size=(256, 256))
        insp = Inspector(model, meta, device="cuda", precision="bf16", maps="none")
        x = np.random.default_rng(0).random((1, 256, 256), dtype=np.float32)
        items = [(f"{i}", x, None) for i in range(1024)]
        torch.cuda.empty_cache()
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, 1.5 * 2**30 / total))
        try:
            with caplog.at_level(logging.WARNING, logger="imganom.inference.pipeline"):
                res = insp.predict_arrays(items)
        finally:
            torch.cuda.set_per_process_memory_fraction(1.0)
            torch.cuda.empty_cache()
        scores = np.array([r.score for r in res])
        assert len(res) == 1024 and np.ptp(scores) <= 1e-3 * scores.max()
        assert insp.adaptive.limit is not None and insp.adaptive.limit < 1024
        assert any("out of memory" in r.message for r in caplog.records)

    def test_prefetcher_on_cuda_same_tensors_in_order(self) -> None:
        src = [torch.randn(64, 1, 128, 128) for _ in range(4)]
        got = [t.cpu() for t in Prefetcher(src, "cuda")]
        assert all(torch.equal(a, b) for a, b in zip(src, got))

    def test_compiled_cuda_graphs_match_eager(self, demo_test_paths: list[Path]) -> None:
        eager = Inspector.load(WEIGHTS, device="cuda", precision="bf16").predict(demo_test_paths)
        comp = Inspector.load(WEIGHTS, device="cuda", precision="bf16", compile=True)
        got = list(comp.predict_batch(demo_test_paths, batch_size=6))  # 16 images: last batch padded 4 -> 6
        assert comp.backend.compiled.fixed == 6
        thr = comp.image_threshold
        for a, b in zip(eager, got):
            assert np.abs(a.anomaly_map - b.anomaly_map).max() <= 1e-2 * a.anomaly_map.max()
            assert a.verdict == b.verdict or abs(a.score - thr) <= 1e-2 * thr  # only a borderline may flip
