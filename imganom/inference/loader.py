"""Which backend runs a model: ``open_backend`` by name, ``auto_backend`` by a short measured warm-up.

Backends: ``torch`` (model files only), ``onnxruntime`` and ``openvino`` (an ``.onnx`` export, or a model file
traced on load, ``inference.graphs``). All three give the same ``HeadOutput`` within the parity tolerance of
``export.onnx`` (fp32; tests/unit/inference/test_backends.py), so the choice changes speed, not verdicts.

``auto`` times every available backend on the same random batch (rounds interleaved, median per backend)
and keeps the fastest; the choice is cached in ``cache_dir()/backend_choice.json`` per model file content,
device, threads, precision, CPU and library versions, so later loads skip the measurement. On CUDA ``auto`` is
the torch backend (fused map kernels, post-processing on the device).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import importlib.util
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from imganom.formats.modelfile import ModelMeta, load_model, resolve_model_path
from imganom.formats.openvinoir import is_ir
from imganom.inference.backends import GraphBackend, OnnxBackend, OpenVinoBackend, TorchBackend
from imganom.inference.graphs import cache_dir, file_digest, traced_graph
from imganom.utils.device import resolve_device
from imganom.utils.files import write_json_atomic
from imganom.utils.version import __version__

BACKENDS = ("torch", "onnxruntime", "openvino")
CHOICES = (*BACKENDS, "auto")
GRAPH_PRECISIONS = ("auto", "fp32")  # onnxruntime runs the graph in fp32 only
AUTO_BATCH = 8
AUTO_ROUNDS = 3
_RUNTIMES = {"onnxruntime": OnnxBackend, "openvino": OpenVinoBackend}
Backend = TorchBackend | GraphBackend


def is_onnx(path: str | Path) -> bool:
    return str(path).lower().endswith(".onnx")


def available_backends(path: str | Path | None = None) -> list[str]:
    """The backends installed here (``torch`` only for model files, not for ``.onnx``; an OpenVINO IR
    ``.xml`` runs on openvino only)."""
    names = [] if path is not None and (is_onnx(path) or is_ir(path)) else ["torch"]
    graph = ["openvino"] if path is not None and is_ir(path) else ["onnxruntime", "openvino"]
    return names + [n for n in graph if importlib.util.find_spec(n) is not None]


def set_torch_threads(threads: int | None) -> None:
    """``torch.set_num_threads`` (process-wide) when ``threads`` is given."""
    if threads:
        torch.set_num_threads(int(threads))


def open_backend(
    path: str | Path,
    backend: str | None = None,
    *,
    device: str = "auto",
    precision: str = "auto",
    threads: int | None = None,
    compile: bool = False,
    compile_mode: str | None = None,
) -> tuple[Backend, ModelMeta]:
    """(backend, model metadata) for a model file, run directory, ``.onnx`` export or OpenVINO IR (``.xml``).
    ``backend``: None = ``torch`` for model files, ``onnxruntime`` for ``.onnx``, ``openvino`` for ``.xml``;
    ``threads``: the runtime's intra-op threads (torch: ``torch.set_num_threads``, process-wide).
    ``precision`` applies to torch and openvino; the onnxruntime graph is fp32. Raises ValueError for an
    unknown or impossible combination, ImportError for a runtime that is not installed, ModelFileError for a
    bad file."""
    onnx, ir = is_onnx(path), is_ir(path)
    name = backend or ("onnxruntime" if onnx else "openvino" if ir else "torch")
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(CHOICES)}, got {name!r}")
    if ir and name != "openvino":
        raise ValueError(f"an OpenVINO IR (.xml) runs on the openvino backend, not {name}")
    onnx = onnx or ir
    if compile and name != "torch":
        raise ValueError("compile applies to torch models, not to .onnx files or graph backends")
    if name == "torch":
        if onnx:
            raise ValueError("a .onnx file runs on onnxruntime or openvino; the torch backend needs the "
                             ".safetensors model")  # fmt: skip
        set_torch_threads(threads)
        model, meta, stats = load_model(path)
        be = TorchBackend(model, meta.cfg, stats, device=device, precision=precision, compile=compile,
                          compile_mode=compile_mode)  # fmt: skip
        return be, meta
    runtime = _RUNTIMES[name]
    if onnx:
        return runtime.open(path, device, threads, precision=precision)
    with traced_graph(path) as (graph, meta, info):
        return runtime.open(graph, device, threads, meta=meta, export_info=info, precision=precision)


def _machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "node": platform.node()}


def _versions() -> dict[str, str]:
    out = {"imganom": __version__, "torch": torch.__version__}
    for mod in ("onnxruntime", "openvino"):
        if importlib.util.find_spec(mod) is not None:
            out[mod] = getattr(__import__(mod), "__version__", "?")
    return out


def _choice_key(path: Path, device: str, precision: str, threads: int | None) -> tuple[str, dict]:
    what = {"model": file_digest(path), "device": device, "precision": precision, "threads": threads,
            "machine": _machine(), "versions": _versions(), "batch": AUTO_BATCH}  # fmt: skip
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:20], what


def _cache_file() -> Path:
    return cache_dir() / "backend_choice.json"


def _read_cache() -> dict[str, Any]:
    try:
        d = json.loads(_cache_file().read_text())
    except (OSError, ValueError):
        return {}
    return d if isinstance(d, dict) else {}


def _write_cache(key: str, entry: dict[str, Any]) -> None:
    try:
        d = _read_cache()
        d[key] = entry
        _cache_file().parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(_cache_file(), d)
    except OSError:  # a read-only cache: measure again next time
        pass


def measure(backends: dict[str, Backend], views: torch.Tensor, rounds: int = AUTO_ROUNDS) -> dict[str, float]:
    """Images per second of each backend on ``views``: one warm-up call each, then ``rounds`` rounds that
    call every backend once in turn (a change in machine load hits all alike); median per backend."""
    for be in backends.values():
        be.maps(views)
    times: dict[str, list[float]] = {n: [] for n in backends}
    for _ in range(rounds):
        for n, be in backends.items():
            t0 = time.perf_counter()
            be.maps(views)
            times[n].append(time.perf_counter() - t0)
    return {n: len(views) / statistics.median(t) for n, t in times.items()}


def auto_backend(
    path: str | Path, *, device: str = "auto", precision: str = "auto", threads: int | None = None
) -> tuple[Backend, ModelMeta]:
    """The fastest available backend for this model on this machine (cached, see the module docstring);
    ``backend.selection`` says what was measured and chosen."""
    onnx = is_onnx(path) or is_ir(path)
    src = Path(path) if onnx else resolve_model_path(path)
    names = available_backends(src)
    if not names:
        raise ImportError(f"{src.name}: an OpenVINO IR runs on openvino (pip install 'imganom[openvino]')")
    if resolve_device(device).type == "cuda":
        names = names[:1]  # torch (fused kernels, device post-processing) or onnxruntime for an export
    if precision not in GRAPH_PRECISIONS:
        names = [n for n in names if n != "onnxruntime"]
    if not onnx and "torch" in names and load_model(src)[1].cfg.map.mc_samples:
        names = ["torch"]
    key, what = _choice_key(src, device, precision, threads)
    hit = _read_cache().get(key)
    if len(names) == 1 or (isinstance(hit, dict) and hit.get("backend") in names):
        name = names[0] if len(names) == 1 else hit["backend"]
        be, meta = open_backend(src, name, device=device, precision=precision, threads=threads)
        be.selection = {"backend": name, "candidates": names, "cached": len(names) > 1}
        if len(names) > 1:
            be.selection.update({k: hit.get(k) for k in ("img_s", "measured", "batch")})
        return be, meta
    opened, skipped = {}, {}
    for n in names:
        try:
            opened[n] = open_backend(src, n, device=device, precision=precision, threads=threads)
        except (ValueError, ImportError) as e:  # e.g. openvino bf16 for an SSIM map: not a candidate
            skipped[n] = str(e)
    if not opened:
        raise ValueError(
            "no backend can run this model: " + "; ".join(f"{n}: {e}" for n, e in skipped.items())
        )
    if len(opened) == 1:
        ((name, (be, meta)),) = opened.items()
        be.selection = {"backend": name, "candidates": [name], "cached": False, "skipped": skipped}
        return be, meta
    cfg = next(iter(opened.values()))[1].cfg
    c, (h, w) = cfg.preprocess.channels, cfg.preprocess.size
    x = torch.rand(AUTO_BATCH, c, max(1, h // 4), max(1, w // 4), generator=torch.Generator().manual_seed(0))
    ips = measure({n: b for n, (b, _) in opened.items()}, F.interpolate(x, size=(h, w), mode="bilinear"))
    name = max(ips, key=ips.__getitem__)
    be, meta = opened[name]
    entry = {"backend": name, "img_s": {n: round(v, 2) for n, v in ips.items()}, "batch": AUTO_BATCH,
             "measured": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), **what}  # fmt: skip
    _write_cache(key, entry)
    be.selection = {"backend": name, "candidates": list(opened), "cached": False,
                    **{k: entry[k] for k in ("img_s", "measured", "batch")}}  # fmt: skip
    if skipped:
        be.selection["skipped"] = skipped
    return be, meta
