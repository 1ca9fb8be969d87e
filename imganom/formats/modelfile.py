"""The model file: one ``.safetensors`` file whose header carries JSON metadata (config, preprocessing,
data fingerprint, versions, calibration). Nothing is ever unpickled.

Layout: tensors ``vae.<param>`` for weights, optional ``stats.<name>`` tensors (e.g. per-pixel normal-map
statistics), and ``__metadata__["imganom"]`` = JSON of ``ModelMeta``.

No verdict without a valid model: reading the metadata checks every field's type, every calibration number
is finite (a NaN threshold would pass every image), and the architecture is within ``MAX_INPUT_SIDE``,
``MAX_FIRST_ACTIVATION`` and ``MAX_PARAMETERS`` (computed on PyTorch's ``meta`` device, allocating nothing);
loading then checks the file's tensor shapes against that architecture before any weight is allocated. Each
problem is one line of the ``ModelFileError``.
"""

from __future__ import annotations

import hashlib
import json
import math
import platform
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from imganom.config import Config, ConfigError, config_from_dict
from imganom.models.vae import ConvVAE
from imganom.ops.neighbours import KEYS as NEIGHBOUR_KEYS
from imganom.utils.files import atomic_path

FORMAT = "imganom-model"
FORMAT_VERSION = 1
MODEL_SUFFIX = ".safetensors"
MAX_INPUT_SIDE = 4096  # pixels per side of the model input
MAX_FIRST_ACTIVATION = 1 << 28  # elements of the first encoder activation per image (1 GiB in float32)
MAX_PARAMETERS = 1 << 28  # weights of the VAE (1 GiB in float32)
_CAL_NUMBERS = ("image_threshold", "pixel_threshold", "score_scale", "target_fpr", "confidence",
                "pixel_quantile", "seconds")  # fmt: skip
_CAL_OBJECTS = ("image_info", "normal_scores", "pixel_stats", "f1_max")


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
    """Write weights + metadata atomically (temp file + rename); returns the metadata written.

    A calibration that ``read_meta`` would refuse (a NaN threshold, a string scale ...) raises
    ``ModelFileError`` and nothing is written."""
    problems = calibration_problems(calibration)
    if problems:
        raise model_file_error(Path(path), problems)
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
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"imganom": json.dumps(asdict(meta))})
    return meta


def read_meta(path: str | Path) -> ModelMeta:
    """Read and validate only the metadata (cheap: no weights are loaded)."""
    p = resolve_model_path(path)
    try:
        with safe_open(str(p), framework="pt") as f:
            raw = (f.metadata() or {}).get("imganom")
    except (SafetensorError, OSError, ValueError) as e:
        raise ModelFileError(f"{p}: not a readable safetensors model file ({e})") from None
    return _parse_meta(raw, p)


def model_file_error(p: Path, problems: list[str]) -> ModelFileError:
    """One ModelFileError for ``problems`` (one line each)."""
    if len(problems) == 1:
        return ModelFileError(f"{p}: {problems[0]}")
    return ModelFileError(f"{p}: {len(problems)} problems in the model file:\n  " + "\n  ".join(problems))


def _parse_meta(raw: str | None, p: Path) -> ModelMeta:
    if raw is None:
        raise ModelFileError(f"{p}: safetensors file has no imganom metadata (not an imganom model)")
    try:
        d = json.loads(raw)
    except (json.JSONDecodeError, RecursionError) as e:
        raise ModelFileError(f"{p}: metadata is not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise ModelFileError(f"{p}: metadata must be a JSON object, got {_kind(d)}")
    if d.get("format") != FORMAT:
        raise ModelFileError(f"{p}: metadata format is {d.get('format')!r}, expected {FORMAT!r}")
    version = d.get("format_version", 0)
    if not _is_int(version):
        raise ModelFileError(f"{p}: format_version must be an integer, got {_kind(version)}")
    if version > FORMAT_VERSION:
        raise ModelFileError(
            f"{p}: model format version {version} is newer than this imganom supports "
            f"({FORMAT_VERSION}); upgrade imganom"
        )
    problems = meta_problems(d)
    if problems:
        raise model_file_error(p, problems)
    meta = ModelMeta(**{k: d[k] for k in ModelMeta.__dataclass_fields__ if k in d})
    meta.size = tuple(meta.size)
    return meta


def meta_problems(d: dict[str, Any]) -> list[str]:
    """Every problem of a decoded metadata dict, one line each (empty: valid). Checks field types, the config,
    size/channels against the config, the architecture limits (nothing is allocated) and the calibration."""
    missing = [repr(k) for k in ("config", "in_channels", "size") if k not in d]
    problems = [f"metadata is missing fields: {', '.join(missing)}"] if missing else []
    types = {"config": dict, "training": dict, "versions": dict, "model_id": str}
    problems += [f"{k}: must be {_TYPE_WORDS[t]}, got {_kind(d[k])}" for k, t in types.items()
                 if k in d and not isinstance(d[k], t)]  # fmt: skip
    size, chans = d.get("size"), d.get("in_channels")
    if "size" in d and not (isinstance(size, list | tuple) and len(size) == 2 and all(map(_is_int, size))):
        problems.append(f"size: must be [height, width] integers, got {_kind(size)} {size!r}"[:200])
        size = None
    if "in_channels" in d and not _is_int(chans):
        problems.append(f"in_channels: must be an integer, got {_kind(chans)}")
        chans = None
    problems += calibration_problems(d.get("calibration"))
    if not isinstance(d.get("config"), dict):
        return problems
    try:
        cfg = config_from_dict(d["config"], "model file config")
    except ConfigError as e:
        return problems + [f"config.{line.strip()}" for line in str(e).splitlines()[1:]]
    if size is not None and chans is not None:
        if tuple(cfg.preprocess.size) != tuple(size) or cfg.preprocess.channels != chans:
            problems.append(
                f"metadata says size {tuple(size)} / {chans} channels but config says "
                f"{tuple(cfg.preprocess.size)} / {cfg.preprocess.channels}"
            )
        else:
            problems += architecture_problems(cfg, chans, tuple(size))
    return problems


def architecture_problems(cfg: Config, in_channels: int, size: tuple[int, int]) -> list[str]:
    """Limits on the model ``cfg`` describes, computed without allocating it (``meta`` device)."""
    h, w = size
    if max(h, w) > MAX_INPUT_SIDE:
        return [f"config.preprocess.size: {h}x{w} exceeds the limit of {MAX_INPUT_SIDE} px a side"]
    first = cfg.model.base_channels * (h // 2) * (w // 2)
    if first > MAX_FIRST_ACTIVATION:
        return [f"config.model.base_channels: {cfg.model.base_channels} channels at {h // 2}x{w // 2} need "
                f"{first} activations per image (limit {MAX_FIRST_ACTIVATION})"]  # fmt: skip
    n = sum(v.numel() for v in _shapes(cfg, in_channels, size).values())
    if n > MAX_PARAMETERS:
        return [f"config.model: the architecture has {n} parameters (limit {MAX_PARAMETERS})"]
    return []


def _shapes(cfg: Config, in_channels: int, size: tuple[int, int]) -> dict[str, torch.Size]:
    """Parameter and buffer shapes of the VAE, built on the ``meta`` device (no memory)."""
    with torch.device("meta"):
        model = ConvVAE(cfg.model, in_channels, size)
    return {k: v.shape for k, v in model.state_dict().items()}


def calibration_problems(cal: Any) -> list[str]:
    """Problems of a calibration dict: thresholds and scale numbers, known objects, every number finite."""
    if cal is None:
        return []
    if not isinstance(cal, dict):
        return [f"calibration: must be an object or null, got {_kind(cal)}"]
    problems = []
    for k in _CAL_NUMBERS:
        if cal.get(k) is not None and not _is_number(cal[k]):
            problems.append(f"calibration.{k}: must be a number, got {_kind(cal[k])}")
    for k in _CAL_OBJECTS:
        if cal.get(k) is not None and not isinstance(cal[k], dict):
            problems.append(f"calibration.{k}: must be an object, got {_kind(cal[k])}")
    if isinstance(cal.get("f1_max"), dict):
        for k in ("image_threshold", "pixel_threshold"):
            v = cal["f1_max"].get(k)
            if (v is not None or k == "image_threshold") and not _is_number(v):
                problems.append(f"calibration.f1_max.{k}: must be a number, got {_kind(v)}")
    if cal.get("score_scale") is not None and _is_number(cal["score_scale"]) and cal["score_scale"] < 0:
        problems.append(f"calibration.score_scale: must be >= 0, got {cal['score_scale']}")
    return problems + [f"{where}: must be finite, got {v}" for where, v in _non_finite(cal, "calibration")]


def _non_finite(v: Any, where: str) -> list[tuple[str, float]]:
    if isinstance(v, float):
        return [] if math.isfinite(v) else [(where, v)]
    if isinstance(v, dict):
        return [x for k, u in v.items() for x in _non_finite(u, f"{where}.{k}")]
    if isinstance(v, list):
        return [x for i, u in enumerate(v) for x in _non_finite(u, f"{where}[{i}]")]
    return []


_TYPE_WORDS = {dict: "an object", str: "a string"}


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _kind(v: Any) -> str:
    """A JSON word for a value's type, with the value when short (``string 'abc'``, ``list``)."""
    word = {dict: "object", list: "list", str: "string", bool: "boolean", type(None): "null"}.get(type(v))
    if word is None:
        return f"number {v}" if _is_number(v) else type(v).__name__
    return f"string {v[:40]!r}" if isinstance(v, str) else word


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[ConvVAE, ModelMeta, dict]:
    """Build the VAE from the file's own config and load its weights; -> (eval-mode model, meta, stats).

    The file's tensor shapes are compared with the architecture before anything is allocated."""
    p = resolve_model_path(path)
    meta = read_meta(p)
    cfg = meta.cfg
    want = {f"vae.{k}": list(v) for k, v in _shapes(cfg, meta.in_channels, meta.size).items()}
    try:
        with safe_open(str(p), framework="pt") as f:
            have = {k: list(f.get_slice(k).get_shape()) for k in f.keys() if k.startswith("vae.")}
    except (SafetensorError, OSError, ValueError) as e:
        raise ModelFileError(f"{p}: cannot read weights ({e})") from None
    bad = [f"{k}: file {have.get(k)} vs architecture {v}" for k, v in want.items() if have.get(k) != v]
    bad += [f"{k}: not in the architecture" for k in have if k not in want]
    if bad:
        raise ModelFileError(
            f"{p}: weights do not match the architecture in its metadata ({len(bad)} tensors; {bad[0]})"
        )
    try:
        tensors = load_file(str(p), device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise ModelFileError(f"{p}: cannot read weights ({e})") from None
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
    if not calibration.get("neighbours"):  # thresholds on raw scores: a stale neighbour reference must go
        old_stats = {k: v for k, v in old_stats.items() if k not in NEIGHBOUR_KEYS}
    return save_model(
        resolve_model_path(path),
        model,
        meta.cfg,
        training=meta.training,
        calibration=calibration,
        stats=old_stats,
    )
