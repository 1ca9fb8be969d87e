"""Scale-out throughput on this machine: ``inspect --engine local`` vs ``--engine ray`` (1 and N actors) and
``train`` in 1 vs N processes (torchrun, DDP over gloo on the CPU; NCCL on CUDA).

    python tools/bench_scale.py                                   # 96 images, 2 actors / processes
    python tools/bench_scale.py --images 400 --workers 4 --json bench_scale.json

Inspection (the shipped demo model, ``tiny`` preset at 64 px; synthetic 64 px PNGs, every default output
written): the local engine (``--local-workers`` decode processes), then
a local Ray instance (``ray.init(num_cpus=--workers)``, its start-up reported apart) running the Ray engine
with 1 and ``--workers`` actors. Reported: end-to-end img/s of the whole run (expansion, actor start, model
loads, rows, results tables; no report.html) and steady img/s between the first and the last row (what a
long run converges to; actor start-up excluded).

Training (the ``tiny`` preset, ``--train-images`` synthetic images, ``--epochs``, global batch
16): ``imganom train`` in one process, then ``--nproc --workers``; img/s is the mean of ``log.csv``'s
``images_per_s`` after the first epoch (all ranks together), start-up reported apart.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def _rate(times: list[float]) -> float | None:
    """img/s between the first and the last row (None with fewer than 2 rows)."""
    return (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 and times[-1] > times[0] else None


def bench_inspect(images: Path, model: Path, workers: int, local_workers: int) -> list[dict[str, Any]]:
    """One row per engine setting: (engine, actors/workers, end-to-end img/s, steady img/s, seconds)."""
    import ray

    from imganom.inference.inspector import Inspector
    from imganom.workflows.inspect import InspectStats, run_inspect
    from imganom.workflows.ray_engine import RayOptions, run_inspect_ray

    insp = Inspector.load(model, device="cpu")
    rows = []

    def run(name: str, par: int, fn) -> None:
        times: list[float] = []

        def tick(st: InspectStats) -> None:
            times.append(time.perf_counter())

        with tempfile.TemporaryDirectory() as out:
            t0 = time.perf_counter()
            got, _ = fn(out, tick)
            secs = time.perf_counter() - t0
        n = len(got)
        steady = round(_rate(times) or 0, 1)
        rows.append({"engine": name, "parallel": par, "images": n, "seconds": round(secs, 2),
                     "end_to_end_img_s": round(n / secs, 1), "steady_img_s": steady})  # fmt: skip
        print(rows[-1], flush=True)

    run("local", local_workers, lambda out, cb: run_inspect(
        insp, [images], out, batch_size=16, workers=local_workers, report=False, on_progress=cb))  # fmt: skip
    t0 = time.perf_counter()
    ray.init(num_cpus=workers, include_dashboard=False, logging_level="WARNING")
    rows.append(
        {"engine": "ray start-up", "parallel": workers, "seconds": round(time.perf_counter() - t0, 2)}
    )
    print(rows[-1], flush=True)
    try:
        for actors in sorted({1, workers}):
            engine = RayOptions(actors=actors)
            run("ray", actors, lambda out, cb, e=engine: run_inspect_ray(
                insp, model, {"device": "cpu"}, [images], out, engine=e, batch_size=16, report=False,
                on_progress=cb))  # fmt: skip
    finally:
        ray.shutdown()
    return rows


def bench_train(data: Path, epochs: int, nprocs: list[int], base: Path) -> list[dict[str, Any]]:
    """One row per process count: training img/s (mean after epoch 1) and the command's wall time."""
    rows = []
    for n in nprocs:
        run = base / f"run{n}"
        cmd = [sys.executable, "-m", "imganom", "train", "--data", str(data), "--config", "tiny",
               "--out", str(run), "--epochs", str(epochs), "--batch-size", "16", "--device", "cpu",
               "--no-calibrate"]  # fmt: skip
        cmd += ["--nproc", str(n)] if n > 1 else []
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True, text=True)
        secs = time.perf_counter() - t0
        with open(run / "log.csv", newline="") as f:
            ips = [float(r["images_per_s"]) for r in csv.DictReader(f)][1:]
        rows.append({"engine": "train", "parallel": n, "seconds": round(secs, 2),
                     "train_img_s": round(sum(ips) / max(len(ips), 1), 1)})  # fmt: skip
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=96, help="images to inspect")
    ap.add_argument("--train-images", type=int, default=96)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--workers", type=int, default=2, help="Ray CPUs / actors and training processes")
    ap.add_argument("--local-workers", type=int, default=2, help="decode processes of the local engine")
    ap.add_argument("--skip-train", action="store_true")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()

    from imganom.data.synth import make_dataset

    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        make_dataset(base / "data", n_train=a.train_images, n_test_good=a.images * 9 // 10,
                     n_test_defect=a.images - a.images * 9 // 10, size=64, seed=0)  # fmt: skip
        from imganom.workflows.demo import WEIGHTS

        rows = bench_inspect(base / "data" / "test", Path(WEIGHTS), a.workers, a.local_workers)
        if not a.skip_train:
            rows += bench_train(base / "data", a.epochs, sorted({1, a.workers}), base)
    print(f"\n{'what':<14}{'parallel':>9}{'seconds':>9}{'img/s end-to-end':>18}{'img/s steady':>14}"
          f"{'train img/s':>13}")  # fmt: skip
    for r in rows:
        cells = [r.get(k) for k in ("seconds", "end_to_end_img_s", "steady_img_s", "train_img_s")]
        cells = ["" if c is None else c for c in cells]
        print(f"{r['engine']:<14}{r['parallel']:>9}{cells[0]:>9}{cells[1]:>18}{cells[2]:>14}{cells[3]:>13}")
    if a.json:
        a.json.write_text(
            json.dumps({"args": {k: str(v) for k, v in vars(a).items()}, "rows": rows}, indent=2)
        )


if __name__ == "__main__":
    main()
