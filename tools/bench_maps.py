"""Benchmark anomaly-map computation: the torch reference vs the fused Triton kernels.

CPU: the torch reference. CUDA (when present): reference and fused kernels, fp32 and bf16 inputs. For each
row, achieved GB/s = (x and recon read once + float32 map written once) / time, next to the device's copy
bandwidth (``clone`` of a large tensor: read + write), i.e. how close the map gets to one pass over memory.

    python tools/bench_maps.py --sizes 128 256 --batch 16 --iters 20 --json bench.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections.abc import Callable

import torch

from imganom.config import MapConfig
from imganom.ops.triton_maps import compute_anomaly_map, triton_available


def _timeit(fn: Callable[[], object], iters: int, warmup: int, cuda: bool) -> float:
    """Seconds per call (mean over ``iters`` after ``warmup`` calls)."""
    for _ in range(warmup):
        fn()
    if cuda:
        torch.cuda.synchronize()
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        stop.record()
        torch.cuda.synchronize()
        return start.elapsed_time(stop) / 1e3 / iters
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - t0) / iters


def copy_bandwidth(device: torch.device, mib: int, iters: int) -> float:
    """Copy bandwidth in GB/s (bytes read + written): ``clone`` on CUDA; on the CPU ``copy_`` into a
    preallocated tensor, since a CPU clone mostly measures page faults of the fresh allocation."""
    cuda = device.type == "cuda"
    a = torch.ones(mib * 2**20 // 4, dtype=torch.float32, device=device)
    b = torch.empty_like(a)
    t = _timeit(a.clone if cuda else lambda: b.copy_(a), iters, 2, cuda)
    return 2 * a.numel() * 4 / t / 1e9


def bench(
    device: torch.device,
    sizes: list[int],
    batch: int,
    channels: int,
    iters: int,
    cfg: MapConfig,
    sigma: float,
) -> list[dict]:
    """One row per (size, input dtype, backend) on ``device``."""
    cuda = device.type == "cuda"
    backends = ["torch", "triton"] if cuda and triton_available() else ["torch"]
    rows = []
    for size in sizes:
        g = torch.Generator().manual_seed(0)
        x = torch.rand(batch, channels, size, size, generator=g).to(device)
        recon = (x + 0.05 * torch.randn(x.shape, generator=g).to(device)).clamp(0, 1)
        for dtype in (torch.float32, torch.bfloat16):
            xd, rd = x.to(dtype), recon.to(dtype)
            nbytes = 2 * xd.numel() * xd.element_size() + batch * size * size * 4
            for backend in backends:
                t = _timeit(lambda: compute_anomaly_map(xd, rd, cfg, sigma, backend), iters, 2, cuda)  # noqa: B023
                rows.append(
                    {
                        "device": device.type,
                        "size": size,
                        "batch": batch,
                        "channels": channels,
                        "dtype": str(dtype).removeprefix("torch."),
                        "backend": backend,
                        "ms_per_batch": t * 1e3,
                        "us_per_image": t * 1e6 / batch,
                        "bytes": nbytes,
                        "gbps": nbytes / t / 1e9,
                    }
                )
    return rows


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[128, 256])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--channels", type=int, default=3)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--sigma", type=float, default=2.0)
    ap.add_argument("--copy-mib", type=int, default=512, help="tensor size for the copy-bandwidth baseline")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)

    cfg = MapConfig()
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    result: dict = {
        "meta": {
            "torch": torch.__version__,
            "python": platform.python_version(),
            "cpu_threads": torch.get_num_threads(),
            "cuda_device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "triton_available": triton_available(),
            "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
            "map_config": cfg.model_dump(),
            "sigma": args.sigma,
            "iters": args.iters,
        },
        "copy_gbps": {},
        "rows": [],
    }
    for dev in devices:
        copy_iters = max(3, args.iters) if dev.type == "cuda" else 3
        copy_mib = args.copy_mib if dev.type == "cuda" else min(args.copy_mib, 128)
        result["copy_gbps"][dev.type] = copy_bw = copy_bandwidth(dev, copy_mib, copy_iters)
        for row in bench(dev, args.sizes, args.batch, args.channels, args.iters, cfg, args.sigma):
            row["pct_of_copy"] = 100 * row["gbps"] / copy_bw
            result["rows"].append(row)

    copies = ", ".join(f"{k} {v:.1f} GB/s" for k, v in result["copy_gbps"].items())
    print(f"copy bandwidth (read+write): {copies}")
    header = f"{'device':6} {'size':>5} {'dtype':8} {'backend':7} "
    header += f"{'ms/batch':>9} {'us/img':>9} {'GB/s':>8} {'%copy':>6}"
    print(header)
    print("-" * len(header))
    for r in result["rows"]:
        print(
            f"{r['device']:6} {r['size']:5d} {r['dtype']:8} {r['backend']:7} {r['ms_per_batch']:9.3f} "
            f"{r['us_per_image']:9.1f} {r['gbps']:8.2f} {r['pct_of_copy']:6.1f}"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
