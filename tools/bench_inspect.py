"""CPU inspection speed per backend: forward-only and end-to-end img/s, batch-1 latency, where the time goes.

    python tools/bench_inspect.py --backends torch,onnxruntime,openvino --json bench_inspect.json
    python tools/bench_inspect.py --sizes 256 --channels 1 --backends openvino --profile

For every size x channels x backend (synthetic PNGs, 10 % defective; the default config at that size and
channel count, randomly initialised with a calibration from its own scores, so masks and regions exist):

* forward only: ``Inspector.model_maps`` (VAE + anomaly map) on preloaded model-sized tensors, batch 16;
* end to end: a real ``imganom inspect --backend B`` subprocess writing every default output (masks,
  heatmaps, overlays, previews, results tables, summary, report); img/s from its ``summary.json`` (the
  inspection itself, without interpreter start-up and model load);
* batch-1 latency: ``Inspector.predict(path)`` one file at a time (decode, model, post-processing; no files
  written), p50 and p99 over ``--latency-calls`` calls.

Backend ``openvino-int8`` is OpenVINO running the same model exported as an INT8 IR (``imganom export --format
openvino --int8``, NNCF calibrated on 64 of the images; random weights, so it measures speed only).

Backends are measured in interleaved rounds (each round runs every backend once), and the medians over
``--rounds`` are reported, so a change in machine load hits every backend alike. ``--profile`` adds the CPU
time (``time.thread_time``, less sensitive to other processes than wall time) of each stage of the same work
done sequentially, for the first backend at the largest size.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the inspecting commands set it (cli.options)

import numpy as np  # noqa: E402
import torch  # noqa: E402

from imganom.config import load_config  # noqa: E402
from imganom.data.discovery import find_images  # noqa: E402
from imganom.data.preprocess import prepare, to_original  # noqa: E402
from imganom.data.readers import read_image, read_options, to_uint8_preview  # noqa: E402
from imganom.formats.modelfile import save_model  # noqa: E402
from imganom.inference import Inspector  # noqa: E402
from imganom.models.vae import ConvVAE  # noqa: E402

INT8 = "openvino-int8"  # a backend name of this tool: openvino running the model's INT8 IR


def runtime(backend: str) -> str:
    """The ``--backend`` that runs this tool's ``backend`` (``openvino-int8`` -> ``openvino``)."""
    return "openvino" if backend == INT8 else backend


def make_data(root: Path, n: int, size: int, channels: int) -> Path:
    """``n`` synthetic images (10% defective) of ``size`` px; returns the folder to inspect."""
    from imganom.data.synth import make_dataset

    if not (root / "test").is_dir():
        n_def = max(1, n // 10)
        make_dataset(
            root, n_train=0, n_test_good=n - n_def, n_test_defect=n_def, size=size, channels=channels, seed=0
        )
    return root / "test"


def make_model(path: Path, size: int, channels: int, sample: list[Path]) -> Path:
    """Random-init default-config model with thresholds from its own scores on ``sample``: the image
    threshold at their 90th percentile (as many NG images as the data has defects: overlays for ~10 %)."""
    cfg = load_config("default", {"preprocess": {"size": [size, size], "channels": channels}})
    torch.manual_seed(0)
    model = ConvVAE(cfg.model, cfg.preprocess.channels, cfg.preprocess.size).eval()
    save_model(path, model, cfg)
    rs = Inspector.load(path, device="cpu").predict(sample)
    scores = [r.score for r in rs]
    cal = {
        "image_threshold": float(np.quantile(scores, 0.9)),
        "pixel_threshold": float(np.quantile(np.concatenate([r.anomaly_map.ravel() for r in rs]), 0.995)),
        "score_scale": float(np.std(scores)) or 1e-3,
        "source": "benchmark (not a real calibration)",
    }
    save_model(path, model, cfg, calibration=cal)
    return path


def cpu_seconds() -> float:
    """CPU time (user + sys) of this process and of its waited-for children (decode workers) so far."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


class Forward:
    """``Inspector.model_maps`` on preloaded model-sized tensors: the model's work alone."""

    def __init__(self, insp: Inspector, paths: list[Path], batch: int):
        self.insp = insp
        pp, kw = insp.cfg.preprocess, read_options(insp.cfg.preprocess)
        x = torch.from_numpy(np.concatenate([prepare(read_image(p, **kw)[0], pp)[0] for p in paths]))
        self.n = len(x)
        self.batches = [x[i : i + batch] for i in range(0, len(x), batch)]
        insp.model_maps(self.batches[0])  # warm-up

    def run(self) -> tuple[float, float]:
        """(images/s, CPU ms per image) of a pass that follows an untimed one: after other work the first
        pass runs slow (torch: 3-4x, large buffers page-faulted in again), which is not the model's speed."""
        for b in self.batches:
            self.insp.model_maps(b)
        c0, t0 = cpu_seconds(), time.perf_counter()
        for b in self.batches:
            self.insp.model_maps(b)
        return self.n / (time.perf_counter() - t0), 1e3 * (cpu_seconds() - c0) / self.n


def end_to_end(model: Path, folder: Path, out: Path, backend: str, a: argparse.Namespace, env: dict) -> dict:
    """``imganom inspect`` as a subprocess, every default output; img/s from its summary.json. ``backend``
    "before": the source tree ``--before`` (an older imganom, torch, its own defaults) instead of this one."""
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "imganom.cli", "inspect", "--model", str(model), "--input", str(folder),
           "--out", str(out), "--device", "cpu", "--batch-size", str(a.batch),
           "--workers", str(a.workers)]  # fmt: skip
    cwd = None
    if backend == "before":  # run from that tree: `python -m` puts the working directory first on sys.path
        env = {k: v for k, v in env.items() if k != "OMP_WAIT_POLICY"}  # as it ran: without it
        env, cwd = {**env, "PYTHONPATH": str(a.before)}, a.before
    else:
        cmd += ["--backend", runtime(backend), "--threads", str(a.threads), "--overlays", a.overlays]
        cmd += ["--decode", a.decode]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd)
    if p.returncode != 0:
        raise RuntimeError(f"imganom inspect failed ({p.returncode}):\n{p.stderr[-3000:]}")
    s = json.loads((out / "summary.json").read_text())
    assert s["model"].get("backend", {"name": "before"})["name"] == runtime(backend), s["model"]
    return {"img_s": s["throughput_img_s"], "ng": s["counts"]["ng"], "errors": s["counts"]["error"]}


def inprocess_cpu(insp: Inspector, folder: Path, out: Path, a: argparse.Namespace) -> float:
    """CPU ms per image of ``run_inspect`` (what the CLI runs) in this process, decode workers included."""
    from imganom.reporting.writers import OutputOptions
    from imganom.workflows.inspect import run_inspect

    shutil.rmtree(out, ignore_errors=True)
    c0 = cpu_seconds()
    rows, _ = run_inspect(insp, [folder], out, batch_size=a.batch, workers=a.workers, decode=a.decode,
                          options=OutputOptions(overlays=a.overlays))  # fmt: skip
    return 1e3 * (cpu_seconds() - c0) / len(rows)


def latency(insp: Inspector, paths: list[Path], calls: int) -> tuple[float, float]:
    """p50, p99 ms of ``Inspector.predict(path)``, one file at a time."""
    for p in paths[:3]:
        insp.predict(p)
    ts = []
    for k in range(calls):
        t0 = time.perf_counter()
        insp.predict(paths[k % len(paths)])
        ts.append((time.perf_counter() - t0) * 1e3)
    return float(np.percentile(ts, 50)), float(np.percentile(ts, 99))


class StageClock:
    """Accumulated CPU seconds per stage: ``with clock("decode"): ...``."""

    def __init__(self) -> None:
        self.t: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str, process: bool = False) -> Iterator[None]:
        fn = time.process_time if process else time.thread_time
        s = fn()
        yield
        self.t[name] = self.t.get(name, 0.0) + fn() - s


def profile_stages(insp: Inspector, paths: list[Path], batch: int) -> dict[str, float]:
    """CPU ms per image of each stage of ``imganom inspect``'s work, done sequentially on this thread
    (``model`` is process CPU time: the backend's own threads included)."""
    from imganom.reporting import writers as W

    pp, kw = insp.cfg.preprocess, read_options(insp.cfg.preprocess)
    vmax, thr = 2.0 * insp.image_threshold, insp.pixel_threshold
    clock = StageClock()
    for i in range(0, len(paths), batch):
        chunk = paths[i : i + batch]
        with clock("decode"):
            decoded = [read_image(p, **kw) for p in chunk]
        with clock("prepare"):
            prepared = [prepare(chw, pp) for chw, _ in decoded]
            x = torch.from_numpy(np.concatenate([v for v, _ in prepared]))
        with clock("model", process=True):
            maps, elbo = insp.model_maps(x)
        with clock("to_original"):
            originals = [to_original(maps[k : k + 1], g) for k, (_, g) in enumerate(prepared)]
        for k, (p, (chw, meta)) in enumerate(zip(chunk, decoded)):
            with clock("postprocess"):
                r = insp.finish(p.name, chw, meta, originals[k], float(elbo[k]), {})
            with clock("preview_u8"):
                preview = to_uint8_preview(chw)
            with clock("mask_png"):
                W.encode_png(np.where(r.mask > 0, 255, 0).astype(np.uint8))
            with clock("heatmap_png"):
                W.heatmap_png(r.anomaly_map, 0.0, vmax)
            with clock("overlay_render"):
                ov = W.render_overlay(
                    preview, r.anomaly_map, r.mask, threshold=thr, vmax=vmax, score=r.score, verdict=r.verdict
                )
            with clock("overlay_png"):
                W.encode_png(ov)
            with clock("preview_jpeg"):
                W.encode_jpeg(preview)
    res = {k: v * 1e3 / len(paths) for k, v in clock.t.items()}
    res["total"] = sum(res.values())
    return res


def bench_config(
    work: Path, size: int, ch: int, backends: list[str], a: argparse.Namespace, env: dict,
    rows: list[dict], load: list[float], profile: bool,
) -> dict[str, float] | None:  # fmt: skip
    """Every backend on one size x channels: rows appended to ``rows``; the stage profile if asked."""
    tag = f"{size}px-{ch}ch"
    folder = make_data(work / f"data-{tag}", a.images, size, ch)
    paths = find_images(folder)
    model = make_model(work / f"model-{tag}.safetensors", size, ch, paths[::5])
    files = {b: model for b in backends}
    if INT8 in backends:  # the same model as an INT8 OpenVINO IR (NNCF, calibrated on these images)
        from imganom.export.openvino import export_openvino

        files[INT8] = work / f"model-{tag}-int8.xml"
        export_openvino(model, files[INT8], int8=True, calib=folder, calib_size=64)
    insps = {
        b: Inspector.load(files[b], device="cpu", backend=runtime(b), threads=a.threads) for b in backends
    }
    fwd = {b: Forward(insps[b], paths[:64], a.batch) for b in backends}
    f_runs: dict[str, list[tuple[float, float]]] = {b: [] for b in backends}
    e_runs: dict[str, list[dict]] = {b: [] for b in backends}
    before: list[float] = []
    for _ in range(a.rounds):
        for b in backends:
            f_runs[b].append(fwd[b].run())
            e_runs[b].append(end_to_end(files[b], folder, work / f"out-{tag}-{b}", b, a, env))
            load.append(os.getloadavg()[0])
        if a.before:
            before.append(end_to_end(model, folder, work / f"out-{tag}-before", "before", a, env)["img_s"])
    if before:
        row = {"size": size, "channels": ch, "backend": "before", "e2e_img_s": statistics.median(before),
               "e2e_runs": before}  # fmt: skip
        rows.append(row)
        print(json.dumps(row), flush=True)
    for b in backends:
        p50, p99 = latency(insps[b], paths, a.latency_calls)
        e_cpu = inprocess_cpu(insps[b], folder, work / f"inproc-{tag}-{b}", a)
        f, f_cpu = (statistics.median(r[k] for r in f_runs[b]) for k in (0, 1))
        e = statistics.median(r["img_s"] for r in e_runs[b])
        row = {"size": size, "channels": ch, "backend": b, "forward_img_s": f, "e2e_img_s": e, "ratio": e / f,
               "forward_cpu_ms": f_cpu, "e2e_cpu_ms": e_cpu, "ratio_cpu": f_cpu / e_cpu, "p50_ms": p50,
               "p99_ms": p99, "forward_runs": [r[0] for r in f_runs[b]],
               "e2e_runs": [r["img_s"] for r in e_runs[b]], "ng": e_runs[b][-1]["ng"]}  # fmt: skip
        rows.append(row)
        print(json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
    return profile_stages(insps[backends[0]], paths[:64], a.batch) if profile else None


def cell(row: dict, key: str, spec: str = ".1f") -> str:
    return format(row[key], spec) if key in row else "–"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backends", default="torch,onnxruntime,openvino")
    ap.add_argument("--sizes", type=int, nargs="+", default=[128, 256])
    ap.add_argument("--channels", type=int, nargs="+", default=[1, 3])
    ap.add_argument("--images", type=int, default=160)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--workers", type=int, default=2, help="imganom inspect --workers (decode threads)")
    ap.add_argument("--decode", default="threads", help="imganom inspect --decode (threads | processes)")
    ap.add_argument("--threads", type=int, default=max(1, min(2, os.cpu_count() or 1)))
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (medians reported)")
    ap.add_argument("--latency-calls", type=int, default=100)
    ap.add_argument("--overlays", default="ng", help="imganom inspect --overlays (ng | all | none)")
    ap.add_argument("--before", type=Path, help="an earlier imganom source tree: its inspect as a baseline")
    ap.add_argument("--profile", action="store_true", help="per-stage CPU time (first backend, largest size)")
    ap.add_argument("--work", type=Path, default=None, help="keep data/models/outputs here (default: temp)")
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args(argv)
    backends = [b.strip() for b in a.backends.split(",") if b.strip()]
    torch.set_num_threads(a.threads)
    work = a.work or Path(tempfile.mkdtemp(prefix="imganom-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    os.environ["IMGANOM_CACHE_DIR"] = str(work / "cache")  # traced graphs: once, shared with the subprocesses
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads)}
    rows: list[dict] = []
    prof = None
    load = [os.getloadavg()[0]]
    try:
        for size in a.sizes:
            for ch in a.channels:
                want_prof = a.profile and size == max(a.sizes) and ch == a.channels[0]
                prof = bench_config(work, size, ch, backends, a, env, rows, load, want_prof) or prof
    finally:
        if a.work is None:
            shutil.rmtree(work, ignore_errors=True)
    print(
        f"\nimganom inspect on the CPU: {a.images} synthetic PNGs per configuration, default config, batch "
        f"{a.batch}, {a.workers} decode {a.decode}, {a.threads} threads, medians of {a.rounds} interleaved "
        f"rounds; load average (1 min) {min(load):.1f}-{max(load):.1f}\n"
    )
    head = ["size", "ch", "backend", "forward img/s", "end-to-end img/s", "e2e / forward",
            "e2e vs torch (vs before)", "CPU ms/img forward", "CPU ms/img e2e", "CPU ratio", "batch-1 p50 ms",
            "batch-1 p99 ms"]  # fmt: skip
    print("| " + " | ".join(head) + " |")
    print("|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        same = [x for x in rows if x["size"] == r["size"] and x["channels"] == r["channels"]]
        ref = next((x for x in same if x["backend"] == "torch"), None)
        old = next((x for x in same if x["backend"] == "before"), None)
        vs = f"{r['e2e_img_s'] / ref['e2e_img_s']:.2f}x" if ref else "–"
        vs += f" ({r['e2e_img_s'] / old['e2e_img_s']:.2f}x)" if old else ""
        cells = [r["size"], r["channels"], r["backend"], cell(r, "forward_img_s"), cell(r, "e2e_img_s"),
                 cell(r, "ratio", ".2f"), vs, cell(r, "forward_cpu_ms"), cell(r, "e2e_cpu_ms"),
                 cell(r, "ratio_cpu", ".2f"), cell(r, "p50_ms"), cell(r, "p99_ms")]  # fmt: skip
        print("| " + " | ".join(str(c) for c in cells) + " |")
    if prof:
        where = f"{backends[0]}, {max(a.sizes)} px, {a.channels[0]} ch"
        print(f"\nCPU ms per image, each stage sequentially ({where}):\n")
        print("| stage | CPU ms/image | share |\n|---|---:|---:|")
        for k, v in prof.items():
            if k != "total":
                print(f"| {k} | {v:.2f} | {100 * v / prof['total']:.0f}% |")
        print(f"| total | {prof['total']:.2f} | 100% |")
    if a.json:
        config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()}
        res = {"config": config, "rows": rows, "profile_cpu_ms_per_image": prof, "loadavg_1min": load,
               "torch": torch.__version__}  # fmt: skip
        a.json.write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
