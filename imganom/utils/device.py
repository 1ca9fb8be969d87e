"""Device and autocast precision choice, shared by training and inference."""

from __future__ import annotations

import torch


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def cpu_has_native_bf16() -> bool:
    """True on x86 CPUs with AVX512-BF16 or AMX-BF16 (per ``/proc/cpuinfo``): bf16 autocast is fast there."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return " avx512_bf16" in line or " amx_bf16" in line
    except OSError:
        pass
    return False


def autocast_dtype(precision: str, device: torch.device, training: bool = False) -> torch.dtype | None:
    """None = fp32. 'auto': bf16 on CUDA when supported (fp16 otherwise). On the CPU 'auto' is bf16 for
    training on CPUs with native bf16 (1.5-1.6x faster there, docs/BENCHMARKS.md) and fp32 otherwise, and
    always fp32 for inspection (bf16 is slower there at batch 1, and calibration stays exact)."""
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        return torch.float16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if training and device.type == "cpu" and cpu_has_native_bf16():
        return torch.bfloat16
    return None


def precision_label(amp: torch.dtype | None) -> str:
    """The ``--precision`` spelling of an autocast dtype: ``bf16``, ``fp16``, or ``fp32`` for None / other."""
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(amp, "fp32")
