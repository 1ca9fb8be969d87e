"""End-to-end ``imganom inspect`` throughput vs model-forward-only throughput on the CPU.

    python tools/bench_inspect.py                      # 200 synthetic 256 px images, default model at 256
    python tools/bench_inspect.py --images 64 --profile --json bench_inspect.json

End to end = a real ``imganom inspect`` subprocess (decode in DataLoader workers, model, post-processing,
masks/heatmaps/overlays/previews, results tables, summary and report); its throughput is taken from
``summary.json`` (the inspection itself, without interpreter start-up and model loading) and, for reference,
from the wall time of the whole process. Forward only = ``Inspector.model_maps`` (VAE + anomaly map +
smoothing) on preloaded tensors at the same batch size. The model is randomly initialised (speed does not
depend on the weights) with a calibration derived from its own scores, so masks and regions are non-trivial.
``--profile`` adds a sequential per-stage breakdown (ms per image) of the same work in this process.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from imganom.config import load_config  # noqa: E402
from imganom.data.discovery import find_images  # noqa: E402
from imganom.data.preprocess import prepare, to_original  # noqa: E402
from imganom.data.readers import read_image, to_uint8_preview  # noqa: E402
from imganom.formats.modelfile import save_model  # noqa: E402
from imganom.inference.inspector import Inspector  # noqa: E402
from imganom.models.vae import ConvVAE  # noqa: E402


def make_data(root: Path, n: int, size: int) -> Path:
    """``n`` synthetic images (10% defective) of ``size`` px; returns the folder to inspect."""
    from imganom.data.synth import make_dataset

    if not (root / "test").is_dir():
        n_def = max(1, n // 10)
        make_dataset(root, n_train=0, n_test_good=n - n_def, n_test_defect=n_def, size=size, seed=0)
    return root / "test"


def make_model(path: Path, size: int, sample: list[Path]) -> Path:
    """Random-init default-config model at ``size`` with thresholds from its own scores on ``sample``."""
    cfg = load_config("default", {"preprocess": {"size": [size, size]}})
    torch.manual_seed(0)
    model = ConvVAE(cfg.model, cfg.preprocess.channels, cfg.preprocess.size).eval()
    save_model(path, model, cfg)
    insp = Inspector.load(path, device="cpu")
    rs = insp.predict(sample)
    scores = [r.score for r in rs]
    pixels = np.concatenate([r.anomaly_map.ravel() for r in rs])
    cal = {
        "image_threshold": float(np.median(scores)),  # about half the images NG: overlays with outlines
        "pixel_threshold": float(np.quantile(pixels, 0.995)),
        "score_scale": float(np.std(scores)) or 1e-3,
        "source": "benchmark (not a real calibration)",
    }
    save_model(path, model, cfg, calibration=cal)
    return path


def _cpu_seconds() -> float:
    """CPU time (user + sys) of this process and of all its waited-for descendants so far."""
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + ru.ru_utime + ru.ru_stime


class Forward:
    """``Inspector.model_maps`` on preloaded model-sized tensors: the device work alone."""

    def __init__(self, model_path: Path, paths: list[Path], batch: int):
        self.insp = Inspector.load(model_path, device="cpu")
        pp = self.insp.cfg.preprocess
        views = [
            prepare(read_image(p, intensity=pp.intensity, channels=pp.channels)[0], pp)[0] for p in paths
        ]
        x = torch.from_numpy(np.concatenate(views))
        self.n = len(x)
        self.batches = [x[i : i + batch] for i in range(0, len(x), batch)]
        self.insp.model_maps(self.batches[0])  # warm-up

    def run(self) -> dict[str, float]:
        c0, t0 = _cpu_seconds(), time.perf_counter()
        for b in self.batches:
            self.insp.model_maps(b)
        wall, cpu = time.perf_counter() - t0, _cpu_seconds() - c0
        return {"seconds": wall, "images_per_s": self.n / wall, "cpu_ms_per_image": 1e3 * cpu / self.n}


def end_to_end_cli(model_path: Path, folder: Path, out: Path, batch: int, workers: int, threads: int) -> dict:
    """Run ``imganom inspect`` as a subprocess; throughput from summary.json and from wall time."""
    shutil.rmtree(out, ignore_errors=True)
    exe = Path(sys.executable).with_name("imganom")
    cmd = [str(exe)] if exe.is_file() else [sys.executable, "-m", "imganom.cli"]
    cmd += ["inspect", "--model", str(model_path), "--input", str(folder), "--out", str(out)]
    cmd += ["--batch-size", str(batch), "--workers", str(workers), "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "NO_ALBUMENTATIONS_UPDATE": "1"}
    c0, t0 = _cpu_seconds(), time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall, cpu = time.perf_counter() - t0, _cpu_seconds() - c0
    if p.returncode != 0:
        raise RuntimeError(f"imganom inspect failed ({p.returncode}):\n{p.stderr[-3000:]}")
    summary = json.loads((out / "summary.json").read_text())
    n = summary["counts"]["total"]
    return {
        "images": n,
        "errors": summary["counts"]["error"],
        "ng": summary["counts"]["ng"],
        "seconds": summary["seconds"],
        "images_per_s": summary["throughput_img_s"],
        "process_wall_seconds": wall,
        "process_images_per_s": n / wall,
        "process_cpu_ms_per_image": 1e3 * cpu / n,  # includes interpreter start-up and model loading
        "torch_threads": summary.get("torch_threads"),
    }


def end_to_end_inprocess(model_path: Path, folder: Path, out: Path, batch: int, workers: int) -> dict:
    """``batch.run_inspect`` (what the CLI calls) in this process: wall and CPU time incl. decode workers."""
    from imganom.workflows.inspect import run_inspect

    shutil.rmtree(out, ignore_errors=True)
    insp = Inspector.load(model_path, device="cpu")
    c0, t0 = _cpu_seconds(), time.perf_counter()
    rows, _ = run_inspect(insp, [folder], out, batch_size=batch, workers=workers)
    wall, cpu = time.perf_counter() - t0, _cpu_seconds() - c0
    n = len(rows)
    return {"images": n, "seconds": wall, "images_per_s": n / wall, "cpu_ms_per_image": 1e3 * cpu / n}


def profile_stages(model_path: Path, paths: list[Path], batch: int, out: Path) -> dict[str, float]:
    """Sequential per-stage cost (ms per image) of what ``imganom inspect`` does for each image."""
    from imganom.reporting.results import ResultsWriter
    from imganom.reporting.writers import (
        OutputOptions,
        _as_rgb,
        _downscale,
        colorize,
        encode_jpeg,
        encode_png,
        render_overlay,
    )
    from imganom.workflows.inspect import Item, result_row, write_outputs

    insp = Inspector.load(model_path, device="cpu")
    pp = insp.cfg.preprocess
    t: dict[str, float] = dict.fromkeys(
        ["decode", "prepare", "model_maps", "to_original", "postprocess", "write_outputs", "results_row"], 0.0
    )
    parts: dict[str, float] = dict.fromkeys(
        ["preview_u8", "mask_png", "heatmap_colorize+png", "overlay_render", "overlay_png", "preview_jpeg"],
        0.0,
    )
    vmax = 2.0 * insp.image_threshold
    options = OutputOptions()
    shutil.rmtree(out, ignore_errors=True)
    with ResultsWriter(out) as writer:
        for i in range(0, len(paths), batch):
            chunk = paths[i : i + batch]
            s = time.perf_counter()
            decoded = [read_image(p, intensity=pp.intensity, channels=pp.channels) for p in chunk]
            t["decode"] += time.perf_counter() - s
            s = time.perf_counter()
            prepared = [prepare(chw, pp) for chw, _ in decoded]
            x = torch.from_numpy(np.concatenate([v for v, _ in prepared]))
            t["prepare"] += time.perf_counter() - s
            s = time.perf_counter()
            maps, elbo = insp.model_maps(x)
            t["model_maps"] += time.perf_counter() - s
            s = time.perf_counter()
            originals = [to_original(maps[k : k + 1], g) for k, (_, g) in enumerate(prepared)]
            t["to_original"] += time.perf_counter() - s
            for k, (p, (chw, meta)) in enumerate(zip(chunk, decoded)):
                s = time.perf_counter()
                r = insp.finish(p.name, chw, meta, originals[k], float(elbo[k]), {}, keep_image=True)
                t["postprocess"] += time.perf_counter() - s
                # the parts of write_outputs, timed separately (encode only, nothing written)
                s = time.perf_counter()
                preview = to_uint8_preview(chw)
                parts["preview_u8"] += time.perf_counter() - s
                s = time.perf_counter()
                encode_png(np.where(r.mask > 0, 255, 0).astype(np.uint8))
                parts["mask_png"] += time.perf_counter() - s
                s = time.perf_counter()
                encode_png(colorize(r.anomaly_map, 0.0, vmax))
                parts["heatmap_colorize+png"] += time.perf_counter() - s
                s = time.perf_counter()
                small = _downscale(_as_rgb(preview), options.max_preview_side)
                thr = r.thresholds["pixel"]
                ov = render_overlay(
                    small,
                    r.anomaly_map,
                    r.mask,
                    threshold=thr,
                    vmax=vmax,
                    score=r.norm_score,
                    verdict=r.verdict,
                )
                parts["overlay_render"] += time.perf_counter() - s
                s = time.perf_counter()
                encode_png(ov)
                parts["overlay_png"] += time.perf_counter() - s
                s = time.perf_counter()
                encode_jpeg(small)
                parts["preview_jpeg"] += time.perf_counter() - s
                # the real thing: encode + atomic writes
                s = time.perf_counter()
                outputs = write_outputs(out, r, options)
                t["write_outputs"] += time.perf_counter() - s
                s = time.perf_counter()
                writer.write(result_row(insp, Item(p, p.name), r, None, outputs))
                t["results_row"] += time.perf_counter() - s
    n = len(paths)
    res = {k: v * 1e3 / n for k, v in t.items()}
    res["total"] = sum(res.values())
    res.update({f"write_outputs.{k}": v * 1e3 / n for k, v in parts.items()})
    return res


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--workers", type=int, default=2, help="imganom inspect --workers (decode processes)")
    ap.add_argument("--threads", type=int, default=max(1, min(2, os.cpu_count() or 1)))
    ap.add_argument("--profile", action="store_true", help="also time each stage sequentially in-process")
    ap.add_argument("--work", type=Path, default=None, help="keep data/model/outputs here (default: temp)")
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    work = a.work or Path(tempfile.mkdtemp(prefix="imganom-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        folder = make_data(work / "data", a.images, a.size)
        paths = find_images(folder)
        model = make_model(work / "model.safetensors", a.size, paths[:8])
        fwd = Forward(model, paths, a.batch)
        # interleave so a change in machine load between measurements biases the ratio less
        fwd_runs = [fwd.run()]
        cli = end_to_end_cli(model, folder, work / "out", a.batch, a.workers, a.threads)
        fwd_runs.append(fwd.run())
        inproc = end_to_end_inprocess(model, folder, work / "out-inproc", a.batch, a.workers)
        fwd_runs.append(fwd.run())
        del fwd
        prof = (
            profile_stages(model, paths[: min(len(paths), 64)], a.batch, work / "prof") if a.profile else None
        )
    finally:
        if a.work is None:
            shutil.rmtree(work, ignore_errors=True)
    f_ips = statistics.median(r["images_per_s"] for r in fwd_runs)
    f_cpu = statistics.median(r["cpu_ms_per_image"] for r in fwd_runs)
    ratio = cli["images_per_s"] / f_ips
    ratio_cpu = f_cpu / inproc["cpu_ms_per_image"]
    print(
        f"\nimganom inspect, {len(paths)} images of {a.size} px, default model, batch {a.batch}, "
        f"{a.workers} decode workers, {a.threads} torch threads, load avg {os.getloadavg()[0]:.1f}\n"
    )
    print("| measurement | images/s | seconds | CPU ms/image |")
    print("|---|---:|---:|---:|")
    runs = ", ".join(f"{r['images_per_s']:.1f}" for r in fwd_runs)
    print(f"| model forward only (model_maps; median of {runs}) | {f_ips:.1f} | – | {f_cpu:.1f} |")
    print(
        f"| `imganom inspect` end to end (summary.json) | {cli['images_per_s']:.1f} | "
        f"{cli['seconds']:.2f} | – |"
    )
    print(
        f"| `imganom inspect` incl. process start + model load | {cli['process_images_per_s']:.1f} | "
        f"{cli['process_wall_seconds']:.2f} | {cli['process_cpu_ms_per_image']:.1f} |"
    )
    print(
        f"| run_inspect in-process end to end | {inproc['images_per_s']:.1f} | {inproc['seconds']:.2f} | "
        f"{inproc['cpu_ms_per_image']:.1f} |"
    )
    print(
        f"\nratio end-to-end / forward-only: {ratio:.2f} (wall, CLI)   {ratio_cpu:.2f} (CPU time, in-process)"
    )
    if prof:
        print("\nper-stage cost, sequential, ms per image:\n")
        print("| stage | ms/image | share |")
        print("|---|---:|---:|")
        for k, v in prof.items():
            if k != "total":
                share = f"{100 * v / prof['total']:.0f}%" if "." not in k else ""
                print(f"| {k} | {v:.2f} | {share} |")
        print(f"| total | {prof['total']:.2f} | 100% |")
    if a.json:
        res = {
            "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()},
            "forward_only": fwd_runs,
            "end_to_end_cli": cli,
            "end_to_end_inprocess": inproc,
            "ratio_wall": ratio,
            "ratio_cpu": ratio_cpu,
            "profile_ms_per_image": prof,
            "torch": torch.__version__,
            "loadavg_1min": os.getloadavg()[0],
        }
        a.json.write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
