"""Training-step throughput on the CPU: fp32 vs bf16 autocast, default model config, random data.

    python tools/bench_train.py                          # 128 and 256 px, batch 16
    python tools/bench_train.py --sizes 128 --steps 10 --json bench_train.json

One step is exactly what ``training.trainer`` does per batch: channels-last input, forward under autocast,
``vae_loss`` (L1 + SSIM + KL), backward, gradient clipping, AdamW. A few warm-up steps are not timed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import torch  # noqa: E402

from imganom.config import load_config  # noqa: E402
from imganom.models.losses import vae_loss  # noqa: E402
from imganom.models.vae import ConvVAE  # noqa: E402

DTYPES = {"fp32": None, "bf16": torch.bfloat16}


def bench_one(
    size: int, precision: str, batch: int, warmup: int, steps: int, budget: float = 60.0, seed: int = 0
) -> dict[str, Any]:
    """Time up to ``steps`` training steps after up to ``warmup`` untimed ones; -> result row.

    Each phase stops early once it used ``budget`` seconds (at least one step each), so very slow
    configurations (bf16 without native CPU support) still finish."""
    cfg = load_config("default", {"preprocess": {"size": [size, size]}})
    torch.manual_seed(seed)
    model = ConvVAE(cfg.model, cfg.preprocess.channels, cfg.preprocess.size).to(
        memory_format=torch.channels_last
    )
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    x = torch.rand(batch, cfg.preprocess.channels, size, size).to(memory_format=torch.channels_last)
    amp = DTYPES[precision]
    times: list[float] = []
    warm: list[float] = []
    loss = float("nan")
    for i in range(warmup + steps):
        if i < warmup and warm and sum(warm) > budget:
            continue  # skip the rest of the warm-up
        if times and sum(times) > budget:
            break
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=amp, enabled=amp is not None):
            out = model(x)
        terms = vae_loss(x, out, cfg.loss, cfg.loss.beta)
        opt.zero_grad(set_to_none=True)
        terms["loss"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        opt.step()
        loss = float(terms["loss"].detach())
        (times if i >= warmup else warm).append(time.perf_counter() - t0)
    med = statistics.median(times)
    return {
        "size": size,
        "precision": precision,
        "batch": batch,
        "warmup_steps": len(warm),
        "timed_steps": len(times),
        "ms_per_step_median": med * 1e3,
        "ms_per_step_min": min(times) * 1e3,
        "images_per_s": batch / med,
        "final_loss": loss,
        "params": sum(p.numel() for p in model.parameters()),
    }


def environment() -> dict[str, Any]:
    mkldnn_bf16 = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "mkldnn_bf16_supported": bool(mkldnn_bf16()) if mkldnn_bf16 else None,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "loadavg_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }


def markdown(rows: list[dict[str, Any]]) -> str:
    """Table with the bf16/fp32 speed ratio per size."""
    fp32 = {r["size"]: r["images_per_s"] for r in rows if r["precision"] == "fp32"}
    lines = [
        "| size | precision | batch | timed steps | ms/step (median) | ms/step (min) | images/s | vs fp32 |",
        "|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        ratio = r["images_per_s"] / fp32[r["size"]] if r["size"] in fp32 else float("nan")
        lines.append(
            f"| {r['size']} | {r['precision']} | {r['batch']} | {r['timed_steps']} | "
            f"{r['ms_per_step_median']:.0f} | "
            f"{r['ms_per_step_min']:.0f} | {r['images_per_s']:.1f} | {ratio:.2f}x |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[128, 256])
    ap.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=sorted(DTYPES))
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--budget", type=float, default=60.0, help="max seconds per phase and configuration")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    env = environment()
    rows = []
    for size in a.sizes:
        for prec in a.precisions:
            rows.append(bench_one(size, prec, a.batch, a.warmup, a.steps, a.budget))
            print(f"  {size} px {prec}: {rows[-1]['images_per_s']:.1f} img/s", flush=True)
    print(
        f"\nCPU training step, default model, torch {env['torch']}, {env['threads']} threads, "
        f"capability {env['cpu_capability']}, mkldnn bf16 {env['mkldnn_bf16_supported']}, "
        f"load avg {env['loadavg_1min']:.1f}\n"
    )
    print(markdown(rows))
    if a.json:
        a.json.write_text(json.dumps({"environment": env, "results": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
