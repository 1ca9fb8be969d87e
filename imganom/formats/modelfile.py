"""The model file: one ``.safetensors`` file whose header carries JSON metadata (config, preprocessing,
data fingerprint, versions, calibration). Nothing is ever unpickled.

Layout: tensors ``vae.<param>`` for weights, optional ``stats.<name>`` tensors (e.g. per-pixel normal-map
statistics), and ``__metadata__["imganom"]`` = JSON of ``ModelMeta``.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from imganom.config import Config, ConfigError, config_from_dict
from imganom.models.vae import ConvVAE

FORMAT = "imganom-model"
FORMAT_VERSION = 1
MODEL_SUFFIX = ".safetensors"


class ModelFileError(ValueError):
    """The model file is missing, unreadable, or its metadata does not match what it claims."""


@dataclass
class ModelMeta:
    """Everything a model file says about itself besides its weights."""

    config: dict[str, Any]
    in_channels: int
    size: tuple[int, int]
    training: dict[str, Any] = field(default_factory=dict)  # data fingerprint, epochs, losses, time
    calibration: dict[str, Any] | None = None  # thresholds and normal-score stats
    versions: dict[str, str] = field(default_factory=dict)
    model_id: str = ""
    format: str = FORMAT
    format_version: int = FORMAT_VERSION

    @property
    def cfg(self) -> Config:
        return config_from_dict(self.config, "model file config")


def library_versions() -> dict[str, str]:
    import numpy

    from imganom.utils.version import __version__

    return {
        "imganom": __version__,
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "python": platform.python_version(),
    }


def _weights_id(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(tensors):
        if k.startswith("vae."):
            h.update(k.encode())
            h.update(tensors[k].detach().cpu().contiguous().float().numpy().tobytes())
    return h.hexdigest()[:16]


def resolve_model_path(path: str | Path) -> Path:
    """Accept the file itself or a run directory containing ``model.safetensors``."""
    p = Path(path)
    if p.is_dir():
        p = p / f"model{MODEL_SUFFIX}"
    if not p.is_file():
        raise ModelFileError(f"model file not found: {path}")
    return p


def save_model(
    path: str | Path,
    model: ConvVAE,
    cfg: Config,
    *,
    training: dict[str, Any] | None = None,
    calibration: dict[str, Any] | None = None,
    stats: dict[str, torch.Tensor] | None = None,
) -> ModelMeta:
    """Write weights + metadata atomically (temp file + rename); returns the metadata written."""
    tensors = {
        f"vae.{k}": v.detach().cpu().contiguous().float() if v.is_floating_point() else v.detach().cpu()
        for k, v in model.state_dict().items()
    }
    for k, v in (stats or {}).items():
        tensors[f"stats.{k}"] = v.detach().cpu().contiguous().float()
    meta = ModelMeta(
        config=cfg.model_dump(mode="json"),
        in_channels=model.in_channels,
        size=tuple(model.size),
        training=training or {},
        calibration=calibration,
        versions=library_versions(),
        model_id=_weights_id(tensors),
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=MODEL_SUFFIX)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={"imganom": json.dumps(asdict(meta))})
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return meta


def read_meta(path: str | Path) -> ModelMeta:
    """Read and validate only the metadata (cheap: no weights are loaded)."""
    from safetensors import safe_open

    p = resolve_model_path(path)
    try:
        with safe_open(str(p), framework="pt") as f:
            raw = (f.metadata() or {}).get("imganom")
    except (SafetensorError, OSError, ValueError) as e:
        raise ModelFileError(f"{p}: not a readable safetensors model file ({e})") from None
    return _parse_meta(raw, p)


def _parse_meta(raw: str | None, p: Path) -> ModelMeta:
    if raw is None:
        raise ModelFileError(f"{p}: safetensors file has no imganom metadata (not an imganom model)")
    try:
        d = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ModelFileError(f"{p}: metadata is not valid JSON ({e})") from None
    if d.get("format") != FORMAT:
        raise ModelFileError(f"{p}: metadata format is {d.get('format')!r}, expected {FORMAT!r}")
    if d.get("format_version", 0) > FORMAT_VERSION:
        raise ModelFileError(
            f"{p}: model format version {d['format_version']} is newer than this imganom supports "
            f"({FORMAT_VERSION}); upgrade imganom"
        )
    try:
        meta = ModelMeta(**{k: d[k] for k in ModelMeta.__dataclass_fields__ if k in d})
        meta.size = tuple(meta.size)
        cfg = meta.cfg
    except (TypeError, KeyError) as e:
        raise ModelFileError(f"{p}: metadata is missing fields ({e})") from None
    except ConfigError as e:
        raise ModelFileError(f"{p}: {e}") from None
    if tuple(cfg.preprocess.size) != meta.size or cfg.preprocess.channels != meta.in_channels:
        raise ModelFileError(
            f"{p}: metadata says size {meta.size} / {meta.in_channels} channels but config says "
            f"{tuple(cfg.preprocess.size)} / {cfg.preprocess.channels}"
        )
    return meta


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[ConvVAE, ModelMeta, dict]:
    """Build the VAE from the file's own config and load its weights; -> (eval-mode model, meta, stats)."""
    p = resolve_model_path(path)
    meta = read_meta(p)
    try:
        tensors = load_file(str(p), device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise ModelFileError(f"{p}: cannot read weights ({e})") from None
    cfg = meta.cfg
    model = ConvVAE(cfg.model, meta.in_channels, meta.size)
    state = {k[4:]: v for k, v in tensors.items() if k.startswith("vae.")}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).splitlines()[0]
        raise ModelFileError(
            f"{p}: weights do not match the architecture in its metadata ({first})"
        ) from None
    if meta.model_id and _weights_id(tensors) != meta.model_id:
        raise ModelFileError(f"{p}: weights checksum does not match metadata model_id (file corrupted?)")
    stats = {k[6:]: v for k, v in tensors.items() if k.startswith("stats.")}
    return model.to(device).eval(), meta, stats


def update_calibration(
    path: str | Path, calibration: dict[str, Any], stats: dict[str, torch.Tensor] | None = None
) -> ModelMeta:
    """Rewrite the file with new calibration (and optionally stats tensors), weights untouched."""
    model, meta, old_stats = load_model(path)
    if stats is not None:
        old_stats = {**old_stats, **stats}
    return save_model(
        resolve_model_path(path),
        model,
        meta.cfg,
        training=meta.training,
        calibration=calibration,
        stats=old_stats,
    )
