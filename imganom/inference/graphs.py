"""A ``.safetensors`` model as an ONNX graph for the graph backends (onnxruntime, OpenVINO), traced on load.

The graph is ``formats.onnxgraph.InspectionGraph`` (what ``imganom export`` writes, without its metadata: the
Inspector takes the metadata from the model file itself). Tracing takes seconds, so the file is cached under
``cache_dir()/graphs`` keyed by the model file's content, the torch version and the opset; a model file that
changes (recalibration: new statistics) gets a new graph. Where the cache cannot be written the graph goes
to a temporary file that is removed once the runtime has loaded it.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch

from imganom.formats.modelfile import ModelMeta, load_model, resolve_model_path
from imganom.formats.onnxgraph import DEFAULT_OPSET, InspectionGraph, trace_onnx
from imganom.ops.head import AnomalyHead
from imganom.utils.files import atomic_path
from imganom.utils.version import __version__

GRAPH_VERSION = 1  # bump when what is traced changes for the same model file


def cache_dir() -> Path:
    """imganom's cache folder: ``$IMGANOM_CACHE_DIR``, else ``$XDG_CACHE_HOME/imganom``, else
    ``~/.cache/imganom`` (not created here)."""
    env = os.environ.get("IMGANOM_CACHE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "imganom"


def file_digest(path: Path) -> str:
    """sha256 of a file's bytes (hex, first 16 characters)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def _trace_to(path: Path, model_path: Path) -> None:
    model, meta, stats = load_model(model_path)
    graph = InspectionGraph(model.float().cpu(), AnomalyHead(meta.cfg, stats, backend="torch"))
    example = torch.rand(2, meta.cfg.preprocess.channels, *meta.cfg.preprocess.size)
    with atomic_path(path) as tmp:
        trace_onnx(graph, example, tmp, DEFAULT_OPSET)


@contextlib.contextmanager
def traced_graph(model_path: str | Path) -> Iterator[tuple[Path, ModelMeta, dict]]:
    """``(ONNX file, model metadata, export info)`` of a model file (or run directory), traced or from the
    cache; the file stays valid inside the ``with`` block. Raises ModelFileError for a bad model file and
    ValueError for a model with Monte-Carlo sampling (``map.mc_samples > 0``: the graph cannot draw)."""
    src = resolve_model_path(model_path)
    _, meta, stats = load_model(src)
    if meta.cfg.map.mc_samples:
        raise ValueError(
            f"map.mc_samples={meta.cfg.map.mc_samples}: Monte-Carlo sampling runs on the torch backend only"
        )
    tag = f"torch{torch.__version__.split('+')[0]}-op{DEFAULT_OPSET}-g{GRAPH_VERSION}"
    name = f"{file_digest(src)}-{tag}.onnx"
    info = {"scales": AnomalyHead(meta.cfg, stats, backend="torch").scales, "source": src.name,
            "traced": tag, "imganom": __version__}  # fmt: skip
    folder = cache_dir() / "graphs"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if not (folder / name).is_file():
            _trace_to(folder / name, src)
        cached = True
    except OSError:  # a read-only cache folder
        cached = False
    if cached:
        yield folder / name, meta, {**info, "cache": str(folder / name)}
        return
    with tempfile.TemporaryDirectory(prefix="imganom-graph-") as tmp:
        _trace_to(Path(tmp) / name, src)
        yield Path(tmp) / name, meta, info
