"""Benchmark the inspection fast path against its floor, stage by stage.

The floor first, per image: the VAE's FLOPs (``torch.utils.flop_counter.FlopCounterMode``) over the
device's peak (``--peak-tflops``; H100 SXM dense bf16/fp16 by default, half of it for fp32 = TF32 tensor
cores), and the map kernels' bytes (x and recon read once in the autocast dtype, the float32 map written
once) over the device's measured copy bandwidth (``clone`` of 1 GiB; on the CPU ``copy_`` of 64 MiB). Then,
for each size, dtype and batch size, images/s, ms/image and the fraction of the floor reached by

  (a) ``vae``:     the VAE forward alone (encode + decode the mean, autocast, channels_last on CUDA);
  (b) ``maps``:    the map kernels alone (``compute_anomaly_map``: fused Triton on CUDA) -> effective GB/s;
  (c) ``predict``: ``Inspector.predict_stream`` from host arrays: pinned copies, model, maps, device
                   post-processing, copies back, regions (floor: max of FLOPs, map bytes, host->device bytes);
  (d) ``inspect``: ``run_inspect`` (what ``imganom inspect`` runs) on PNG files: decoding workers, all
                   outputs written.

Also peak device memory per row, and bf16/fp16 vs fp32 on the demo model and data (max |map difference| /
map max, verdict agreement). Untrained default-config models are used for timing (timing does not depend on
the weights); their thresholds are set from a first pass so that about half the images are NG.

    python tools/bench_gpu.py --json bench_gpu.json --md docs/BENCHMARKS.md   # GPU machine
    python tools/bench_gpu.py --quick                                          # CPU dry run (~1 min)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from imganom.config import Config, load_config  # noqa: E402
from imganom.formats.modelfile import ModelMeta, save_model  # noqa: E402
from imganom.inference.compiled import vae_forward  # noqa: E402
from imganom.inference.inspector import Inspector  # noqa: E402
from imganom.inference.pipeline import is_oom, release_memory  # noqa: E402
from imganom.models.vae import ConvVAE  # noqa: E402
from imganom.ops.triton_maps import compute_anomaly_map, triton_available  # noqa: E402
from imganom.reporting.writers import OutputOptions  # noqa: E402
from imganom.utils.device import resolve_device  # noqa: E402
from imganom.workflows.inspect import run_inspect  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
MD_START, MD_END = "<!-- bench_gpu:start -->", "<!-- bench_gpu:end -->"


# ------------------------------------------------------------------------------------------------ timing


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def timeit(fn: Callable[[], object], dev: torch.device, iters: int, warmup: int) -> float:
    """Seconds per call: mean over ``iters`` calls after ``warmup``; CUDA events on the GPU."""
    for _ in range(warmup):
        fn()
    _sync(dev)
    if dev.type == "cuda":
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        stop.record()
        stop.synchronize()
        return start.elapsed_time(stop) / 1e3 / iters
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - t0) / iters


def copy_bandwidth(dev: torch.device) -> float:
    """Device copy bandwidth in GB/s, bytes read + written: ``clone`` of 1 GiB on CUDA; on the CPU ``copy_``
    of 64 MiB into a preallocated tensor (a fresh CPU allocation mostly measures page faults)."""
    n = (2**30 if dev.type == "cuda" else 64 * 2**20) // 4
    a = torch.ones(n, device=dev)
    b = torch.empty_like(a)
    t = timeit(a.clone if dev.type == "cuda" else lambda: b.copy_(a), dev, iters=10, warmup=2)
    return 2 * n * 4 / t / 1e9


def h2d_bandwidth(dev: torch.device) -> float | None:
    """Pinned host -> device bandwidth in GB/s (None on the CPU)."""
    if dev.type != "cuda":
        return None
    h = torch.ones(256 * 2**20 // 4, pin_memory=True)
    d = torch.empty(h.shape, device=dev)
    t = timeit(lambda: d.copy_(h, non_blocking=True), dev, iters=10, warmup=2)
    return h.numel() * 4 / t / 1e9


def cpu_peak_tflops() -> float:
    """A measured fp32 GEMM rate: the CPU's practical FLOP/s ceiling for the dry run."""
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    t = timeit(lambda: a @ b, torch.device("cpu"), iters=5, warmup=1)
    return 2 * 1024**3 / t / 1e12


# ---------------------------------------------------------------------------------------------- the floor


def make_config(size: int) -> Config:
    return load_config(None, {"preprocess": {"size": [size, size]}})


def vae_flops(cfg: Config) -> int:
    """FLOPs of one image through encode + decode (2 per multiply-add), counted on the CPU in fp32."""
    model = ConvVAE(cfg.model, cfg.preprocess.channels, cfg.preprocess.size).eval()
    x = torch.rand(1, cfg.preprocess.channels, *cfg.preprocess.size)
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        vae_forward(model, x)
    return int(fc.get_total_flops())


def map_bytes(cfg: Config, dtype: torch.dtype) -> int:
    """Floor bytes of the map per image: x and recon read once in ``dtype``, the float32 map written once."""
    h, w = cfg.preprocess.size
    return 2 * cfg.preprocess.channels * h * w * torch.finfo(dtype).bits // 8 + h * w * 4


# --------------------------------------------------------------------------------------------- the stages


def build_inspector(
    cfg: Config,
    folder: Path,
    dev: torch.device,
    precision: str,
    compile: bool,
    sample: list[np.ndarray],
    maps: str = "all",
    seed: int = 0,
) -> Inspector:
    """An untrained model saved as a model file, with thresholds from a CPU pass over ``sample`` (the image
    threshold is the median score, so about half of such images are NG)."""
    path = folder / f"model_{cfg.preprocess.size[0]}.safetensors"
    if not path.is_file():
        torch.manual_seed(seed)
        model = ConvVAE(cfg.model, cfg.preprocess.channels, cfg.preprocess.size).eval()
        meta = ModelMeta(config=cfg.model_dump(mode="json"), in_channels=model.in_channels, size=model.size)
        rs = Inspector(model, meta, device="cpu", precision="fp32").predict(sample)
        cal = {
            "image_threshold": float(np.median([r.score for r in rs])),
            "pixel_threshold": float(np.quantile(np.stack([r.anomaly_map for r in rs]), 0.999)),
            "score_scale": 0.05,
        }
        save_model(path, model, cfg, calibration=cal)
    return Inspector.load(path, device=str(dev), precision=precision, compile=compile, maps=maps)


def write_pngs(cfg: Config, folder: Path, n: int) -> tuple[Path, list[np.ndarray]]:
    """``n`` synthetic 8-bit PNGs of the model's size (``synth.make_dataset``'s train/good), and the same
    images decoded (normalised CHW float32) for the stages that start from host arrays."""
    from imganom.data.readers import read_image
    from imganom.data.synth import make_dataset

    make_dataset(folder, n_train=n, n_test_good=0, n_test_defect=0, size=cfg.preprocess.size[0])
    good = folder / "train" / "good"
    pp = cfg.preprocess
    arrays = [
        read_image(p, intensity=pp.intensity, channels=pp.channels)[0] for p in sorted(good.glob("*.png"))
    ]
    return good, arrays


def _peak_mib(dev: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(dev) / 2**20 if dev.type == "cuda" else None


def _reset_peak(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)


def stage_vae(insp: Inspector, batch: int, iters: int, warmup: int) -> tuple[float, float | None]:
    """(a) seconds per batch of the VAE forward alone, and peak MiB."""
    dev, cfg = insp.device, insp.cfg
    x = torch.rand(batch, cfg.preprocess.channels, *cfg.preprocess.size, device=dev)
    if dev.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
    fwd = insp.backend.compiled or (lambda v: vae_forward(insp.model, v))

    @torch.no_grad()
    def run() -> object:
        with torch.autocast(dev.type, dtype=insp.amp, enabled=insp.amp is not None):
            return fwd(x)

    _reset_peak(dev)
    return timeit(run, dev, iters, warmup), _peak_mib(dev)


def stage_maps(insp: Inspector, batch: int, dtype: torch.dtype, iters: int, warmup: int) -> float:
    """(b) seconds per batch of the map kernels (map + smoothing) on x and recon in ``dtype``."""
    dev, cfg = insp.device, insp.cfg
    g = torch.Generator().manual_seed(0)
    x = torch.rand(batch, cfg.preprocess.channels, *cfg.preprocess.size, generator=g)
    r = (x + 0.05 * torch.randn(x.shape, generator=g)).clamp(0, 1)
    x, r = x.to(dev, dtype), r.to(dev, dtype)
    return timeit(lambda: compute_anomaly_map(x, r, cfg.map, cfg.postprocess.sigma), dev, iters, warmup)


def stage_predict(
    insp: Inspector, arrays: list[np.ndarray], batch: int, iters: int, warmup: int
) -> tuple[float, float | None, float]:
    """(c) seconds per batch through ``predict_stream`` (``iters`` batches pipelined), peak MiB, NG share."""
    items = [(f"img{i}", arrays[i % len(arrays)], None) for i in range(batch)]
    ng = [0]

    def run(n: int) -> None:
        for _, rs in insp.predict_stream((None, items, None) for _ in range(n)):
            assert len(rs) == batch
            ng[0] += sum(r.is_anomalous for r in rs)

    run(warmup)
    _sync(insp.device)
    _reset_peak(insp.device)
    ng[0] = 0
    t0 = time.perf_counter()
    run(iters)
    _sync(insp.device)
    return (time.perf_counter() - t0) / iters, _peak_mib(insp.device), ng[0] / (iters * batch)


def stage_inspect(
    insp: Inspector, folder: Path, batch: int, workers: int
) -> tuple[float, float | None, float]:
    """(d) seconds per image of ``run_inspect`` on the PNGs in ``folder`` (all outputs written), peak MiB,
    NG share."""
    with tempfile.TemporaryDirectory() as out:
        run_inspect(insp, [folder], out, batch_size=batch, workers=workers, report=False)  # warm-up
    _reset_peak(insp.device)
    with tempfile.TemporaryDirectory() as out:
        rows, summary = run_inspect(
            insp, [folder], out, batch_size=batch, workers=workers, report=False, options=OutputOptions()
        )
    assert all(r["status"] == "ok" for r in rows), [r["error"] for r in rows if r["error"]][:3]
    return summary["seconds"] / len(rows), _peak_mib(insp.device), summary["counts"]["ng"] / len(rows)


# ------------------------------------------------------------------------------------------------ parity


def parity(dev: torch.device, dtypes: list[str]) -> dict[str, Any]:
    """Reduced precision vs fp32 on the demo model and its synthetic test set (same device)."""
    from imganom.data.discovery import find_images
    from imganom.workflows.demo import WEIGHTS, make_demo_data

    with tempfile.TemporaryDirectory() as tmp:
        paths = find_images(make_demo_data(Path(tmp) / "demo") / "test")
        ref = Inspector.load(WEIGHTS, device=str(dev), precision="fp32").predict(paths)
        out: dict[str, Any] = {"images": len(paths), "ng_fp32": sum(r.is_anomalous for r in ref)}
        for name in dtypes:
            if name == "fp32":
                continue
            got = Inspector.load(WEIGHTS, device=str(dev), precision=name).predict(paths)
            rel = [
                np.abs(a.anomaly_map - b.anomaly_map).max() / a.anomaly_map.max() for a, b in zip(ref, got)
            ]
            out[name] = {
                "max_rel_map_error": float(max(rel)),
                "max_rel_score_error": float(
                    max(abs(a.score - b.score) / abs(a.score) for a, b in zip(ref, got))
                ),
                "verdicts_agree": sum(a.verdict == b.verdict for a, b in zip(ref, got)),
            }
    return out


# -------------------------------------------------------------------------------------------------- main


def _fmt(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def markdown(result: dict) -> str:
    """The report: context lines and one table."""
    m = result["meta"]
    lines = [
        f"Device: **{m['device_name']}** ({m['device']}), torch {m['torch']}, triton {m['triton']}; "
        f"{m['date']}; `{m['command']}`",
        "",
        f"- copy bandwidth (read + write): {m['copy_gbps']:.1f} GB/s"
        + (f"; host->device pinned: {m['h2d_gbps']:.1f} GB/s" if m["h2d_gbps"] else ""),
        f"- peak TFLOP/s used for the floor: {m['peak_tflops']} ({m['peak_note']})",
        f"- Inspector(maps={m['maps']!r}, compile={m['compile']}); timed iterations: {m['iters']}",
    ]
    for s, f in result["floors"].items():
        per = ", ".join(f"{k} {v / 1e6:.2f} MB" for k, v in f["map_bytes"].items())
        lines.append(f"- {s}x{s}: VAE {f['vae_gflops']:.3f} GFLOP/image; map floor bytes/image: {per}")
    n = result.get("parity", {}).get("images")
    for name, p in result.get("parity", {}).items():
        if isinstance(p, dict):
            lines.append(
                f"- {name} vs fp32 (demo model, {n} images): max |map diff| / map max "
                f"{p['max_rel_map_error']:.2e}, max rel. score diff {p['max_rel_score_error']:.2e}, "
                f"verdicts agree {p['verdicts_agree']}/{n}"
            )
    lines += [
        "",
        "Stages: `vae` forward only; `maps` map kernels only (GB/s = floor bytes / time); `predict` "
        "Inspector.predict_stream from host arrays; `inspect` run_inspect on PNG files, all outputs. "
        "`% floor` = floor time / measured time (floor: FLOPs / peak for `vae`, map bytes / copy bandwidth "
        "for `maps`, the larger of those and the host->device copy for `predict`/`inspect`).",
        "",
        "| size | dtype | batch | stage | img/s | ms/img | achieved | floor ms/img | % floor | peak MiB "
        "| NG |",
        "|---:|---|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        if r.get("error"):
            lines.append(f"| {r['size']} | {r['dtype']} | {r['batch']} | {r['stage']} | {r['error']} ||||||")
            continue
        lines.append(
            f"| {r['size']} | {r['dtype']} | {r['batch']} | {r['stage']} | {r['img_s']:.1f} "
            f"| {r['ms_img']:.3f} | {r['achieved']} | {r['floor_ms_img']:.4f} | {r['pct_floor']:.1f} "
            f"| {_fmt(r['peak_mib'], '.0f')} | {_fmt(r.get('ng'), '.0%')} |"
        )
    return "\n".join(lines)


def write_markdown_section(path: Path, text: str) -> None:
    """Put ``text`` between the bench_gpu markers in ``path`` (appended with a heading the first time)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    old = path.read_text() if path.is_file() else ""
    block = f"{MD_START}\n{text}\n{MD_END}"
    if MD_START in old and MD_END in old:
        new = re.sub(re.escape(MD_START) + r".*?" + re.escape(MD_END), lambda _: block, old, flags=re.S)
    else:
        new = (
            (old.rstrip() + "\n\n" if old else "")
            + "## GPU fast path (tools/bench_gpu.py)\n\n"
            + block
            + "\n"
        )
    path.write_text(new)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 64, 256])
    ap.add_argument("--dtypes", nargs="+", default=["fp32", "bf16", "fp16"], choices=list(DTYPES))
    ap.add_argument("--stages", nargs="+", default=["vae", "maps", "predict", "inspect"])
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--peak-tflops", type=float, default=989.4, help="bf16/fp16 dense peak (H100 SXM: 989)")
    ap.add_argument(
        "--peak-tflops-fp32", type=float, default=None, help="default: half of --peak-tflops (TF32)"
    )
    ap.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="decoders for `inspect`")
    ap.add_argument("--inspect-images", type=int, default=512, help="PNG files per size for `inspect`")
    ap.add_argument(
        "--compile", action="store_true", help="Inspector(compile=True): torch.compile + CUDA graphs"
    )
    ap.add_argument("--maps", default="all", choices=["all", "ng", "none"], help="Inspector(maps=...)")
    ap.add_argument("--no-parity", action="store_true")
    ap.add_argument(
        "--quick", action="store_true", help="CPU dry run: 128 px, batch 1 and 8, fp32/bf16, 2 iters"
    )
    ap.add_argument("--json", help="write all results here")
    ap.add_argument("--md", help="write the table into this markdown file (between bench_gpu markers)")
    args = ap.parse_args(argv)
    if args.quick:
        args.sizes, args.batches, args.dtypes = [128], [1, 8], ["fp32", "bf16"]
        args.iters, args.warmup, args.inspect_images, args.workers = 2, 1, 16, 0

    dev = resolve_device(args.device)
    cuda = dev.type == "cuda"
    if cuda:
        peak = {"bf16": args.peak_tflops, "fp16": args.peak_tflops}
        peak["fp32"] = args.peak_tflops_fp32 or args.peak_tflops / 2
        note = "--peak-tflops for bf16/fp16, fp32 = TF32 tensor cores"
    else:
        p = cpu_peak_tflops()
        peak = dict.fromkeys(DTYPES, p)
        note = "CPU: measured fp32 1024^2 GEMM rate, used for every dtype"
    import triton

    result: dict[str, Any] = {
        "meta": {
            "device": str(dev),
            "device_name": torch.cuda.get_device_name(dev) if cuda else platform.processor() or "cpu",
            "torch": torch.__version__,
            "triton": triton.__version__,
            "triton_kernels": triton_available(),
            "python": platform.python_version(),
            "cpu_threads": torch.get_num_threads(),
            "date": time.strftime("%Y-%m-%d"),
            "command": "python tools/bench_gpu.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "copy_gbps": copy_bandwidth(dev),
            "h2d_gbps": h2d_bandwidth(dev),
            "peak_tflops": {k: round(v, 3) for k, v in peak.items()},
            "peak_note": note,
            "compile": args.compile,
            "maps": args.maps,
            "iters": args.iters,
        },
        "floors": {},
        "rows": [],
    }
    meta = result["meta"]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for size in args.sizes:
            cfg = make_config(size)
            flops = vae_flops(cfg)
            mb = {d: map_bytes(cfg, DTYPES[d]) for d in args.dtypes}
            result["floors"][size] = {"vae_gflops": flops / 1e9, "map_bytes": mb}
            h2d = cfg.preprocess.channels * size * size * 4  # the host batch is float32
            pngs, arrays = write_pngs(cfg, tmp / f"png{size}", args.inspect_images)
            for dname in args.dtypes:
                insp = build_inspector(cfg, tmp, dev, dname, args.compile, arrays[:16], args.maps)
                t_flop = flops / (peak[dname] * 1e12)
                t_map = mb[dname] / (meta["copy_gbps"] * 1e9)
                t_h2d = h2d / (meta["h2d_gbps"] * 1e9) if meta["h2d_gbps"] else 0.0
                floors = {"vae": t_flop, "maps": t_map, "predict": max(t_flop, t_map, t_h2d)}
                floors["inspect"] = floors["predict"]
                for batch in args.batches:
                    for stage in args.stages:
                        row = {"size": size, "dtype": dname, "batch": batch, "stage": stage}
                        try:
                            peak_mib = None
                            if stage == "vae":
                                t, peak_mib = stage_vae(insp, batch, args.iters, args.warmup)
                                t /= batch
                                achieved = f"{flops / t / 1e12:.2f} TFLOP/s"
                            elif stage == "maps":
                                t = stage_maps(insp, batch, DTYPES[dname], args.iters, args.warmup) / batch
                                achieved = f"{mb[dname] / t / 1e9:.1f} GB/s"
                            elif stage == "predict":
                                t, peak_mib, row["ng"] = stage_predict(
                                    insp, arrays, batch, args.iters, args.warmup
                                )
                                t /= batch
                                achieved = f"{flops / t / 1e12:.2f} TFLOP/s"
                            elif stage == "inspect":
                                t, peak_mib, row["ng"] = stage_inspect(insp, pngs, batch, args.workers)
                                achieved = f"{flops / t / 1e12:.2f} TFLOP/s"
                            else:
                                raise SystemExit(f"unknown stage {stage!r}")
                        except Exception as e:  # noqa: BLE001 - one failed cell must not lose the table
                            if not is_oom(e):
                                raise
                            release_memory()
                            row["error"] = "OOM"
                            result["rows"].append(row)
                            continue
                        row.update(
                            img_s=1.0 / t,
                            ms_img=t * 1e3,
                            achieved=achieved,
                            floor_ms_img=floors[stage] * 1e3,
                            pct_floor=100.0 * floors[stage] / t,
                            peak_mib=peak_mib,
                        )
                        result["rows"].append(row)
                        print(
                            f"{size:4d} {dname:5s} b={batch:<4d} {stage:8s} {row['img_s']:10.1f} img/s "
                            f"{row['ms_img']:9.3f} ms/img {achieved:>16s} {row['pct_floor']:6.1f}% of floor",
                            flush=True,
                        )
                del insp
                release_memory()
    if not args.no_parity:
        result["parity"] = parity(dev, args.dtypes)
    md = markdown(result)
    print()
    print(md)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2, default=str))
    if args.md:
        write_markdown_section(Path(args.md), md)
    return result


if __name__ == "__main__":
    main()
