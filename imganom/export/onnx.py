"""ONNX export of the inspection graph, and ``OnnxInspector``: the same ``Result`` objects from onnxruntime.

The exported graph is ``AnomalyGraph``: input ``images`` (N, C, h, w) float32, preprocessed (model size,
intensity-normalised to [0, 1]) with a dynamic batch axis; outputs

* ``anomaly_map`` (N, h, w) float32: the smoothed model-resolution map exactly as ``Inspector.model_maps``
  computes it on the torch reference path (encode -> decode the mean -> ``anomaly_map.pixel_map`` ->
  per-pixel standardisation with the model's stats tensors baked in as constants -> Gaussian smoothing);
* ``score`` (N,): the image score of that map under ``postprocess.score`` (``max``, ``topk_mean`` or
  ``elbo``) with ``postprocess.border`` applied. It equals ``Inspector``'s score for a model-sized input with
  no ROI; for other sizes ``Inspector`` scores the map after resampling to the original size, which is what
  ``OnnxInspector`` does too (it uses only ``anomaly_map`` and ``elbo``);
* ``elbo`` (N,): the per-view negative ELBO (map mean + per-pixel KL), as ``model_maps`` returns it.

Everything that is not a model property stays out of the graph and goes into ``metadata_props`` (each value
a JSON document): thresholds, calibration, the preprocessing constants, the full config, the model id and
export details. Recalibration is therefore a metadata edit (``update_onnx_thresholds``), never a re-export.

Not exported: Monte-Carlo sampling (``map.mc_samples > 0``) needs random draws per call; ``export_onnx``
refuses such a model unless ``allow_mc=True``, which exports the deterministic mean-decoding map and stores
the config with ``mc_samples: 0`` (so the file describes what it computes; thresholds calibrated with MC may
no longer fit). ROI masks and tiling/letterbox geometry are applied outside the graph, by ``OnnxInspector``.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import tempfile
import threading
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from imganom.config import Config
from imganom.formats.modelfile import (
    FORMAT_VERSION,
    ModelFileError,
    ModelMeta,
    load_model,
    resolve_model_path,
)
from imganom.inference.inspector import Inspector
from imganom.models.vae import ConvVAE, kl_divergence
from imganom.ops.maps import SSIM_C1, SSIM_C2, SSIM_SIGMA, gaussian_kernel1d

ONNX_FORMAT = "imganom-onnx"
ONNX_FORMAT_VERSION = 1
INPUT_NAME = "images"
OUTPUT_NAMES = ("anomaly_map", "score", "elbo")
DEFAULT_OPSET = 18
# Parity ONNX vs torch (``--check`` and the tests): max |onnx - torch| of a map relative to its max |value|.
# Both sides are fp32; the SSIM variance terms E[x^2] - E[x]^2 lose ~5e-5 absolute to cancellation in either
# implementation (measured against float64), so summation order alone moves maps by ~1e-5 of their max.
# Standardised maps divide that by the per-pixel normal std (floored at 0.1 x its mean): 10x looser.
PARITY_RTOL = 1e-4
PARITY_RTOL_STANDARDIZED = 1e-3
META_PREFIX = "imganom."


class ExportError(RuntimeError):
    """The model could not be exported, or the exported graph failed its checks."""


class UnsupportedModelError(ExportError):
    """The model's config asks for something the graph cannot compute (a usage error, not a failure)."""


# ---------------------------------------------------------------------------------------------- the graph


def _kernel_pair(taps: torch.Tensor, channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Depthwise horizontal (c, 1, 1, K) and vertical (c, 1, K, 1) kernels with static shapes."""
    k = taps.float()
    return (k.view(1, 1, 1, -1).repeat(channels, 1, 1, 1), k.view(1, 1, -1, 1).repeat(channels, 1, 1, 1))


class AnomalyGraph(nn.Module):
    """The exported computation: ``Inspector.model_maps`` (torch reference path, no MC) plus the image score.

    Same arithmetic as ``anomaly_map.pixel_map`` / ``ssim_map`` / ``gaussian_blur``, but every kernel is a
    constant of static shape and every size a Python int, so the graph traces with a dynamic batch axis only.
    The padding mode (reflect, or replicate when the side is not larger than the radius) is fixed at export
    time, as the model size is.
    """

    def __init__(self, model: ConvVAE, cfg: Config, stats: dict[str, torch.Tensor] | None = None):
        super().__init__()
        self.vae = model.eval()
        mcfg, pp, post = cfg.map, cfg.preprocess, cfg.postprocess
        self.h, self.w = (int(s) for s in pp.size)
        self.c = int(pp.channels)
        self.l1, self.l2, self.ssim = float(mcfg.l1), float(mcfg.l2), float(mcfg.ssim)
        self.reduce_max = mcfg.channel_reduce == "max"
        self.sigma = float(post.sigma)
        stats = stats or {}
        self.zmode = mcfg.standardize if "map_mean" in stats else "off"  # as Inspector.standardize_mode
        self.standardize = self.zmode != "off"
        self.output_names = OUTPUT_NAMES + (("score_map",) if self.zmode == "score" else ())
        # Inspector's "fused" case (no MC, no standardisation): the ELBO's map term is the smoothed map
        self.fused = not self.standardize
        self.score_kind = post.score
        self.border = int(post.border)
        n_pix = (self.h - 2 * self.border) * (self.w - 2 * self.border)
        self.topk = max(1, math.ceil(post.topk * n_pix))
        self.numel = self.c * self.h * self.w

        r = mcfg.ssim_window // 2
        self.ssim_pad, self.ssim_mode = r, "reflect" if min(self.h, self.w) > r else "replicate"
        kh, kv = _kernel_pair(gaussian_kernel1d(SSIM_SIGMA, radius=r), 5 * self.c)
        self.register_buffer("ssim_kh", kh)
        self.register_buffer("ssim_kv", kv)
        if self.sigma > 0:
            taps = gaussian_kernel1d(self.sigma)
            rb = taps.numel() // 2
            self.blur_pad, self.blur_mode = rb, "reflect" if min(self.h, self.w) > rb else "replicate"
            bh, bv = _kernel_pair(taps, 1)
            self.register_buffer("blur_kh", bh)
            self.register_buffer("blur_kv", bv)
        if self.standardize:
            self.register_buffer("map_mean", stats["map_mean"].float().reshape(1, self.h, self.w).clone())
            self.register_buffer("map_std", stats["map_std"].float().reshape(1, self.h, self.w).clone())
        # multi-scale maps (as Inspector.scale_sigmas): one blur per scale, then the max of the z-scores
        self.scales = [self.sigma, *mcfg.scales] if mcfg.scales and "scale_mean" in stats else []
        self.fused = self.fused and not self.scales
        self.scale_pads: list[tuple[int, str]] = []
        for k, sg in enumerate(self.scales):
            taps = gaussian_kernel1d(sg)
            rb = taps.numel() // 2
            self.scale_pads.append((rb, "reflect" if min(self.h, self.w) > rb else "replicate"))
            sh, sv = _kernel_pair(taps, 1)
            self.register_buffer(f"scale_kh{k}", sh)
            self.register_buffer(f"scale_kv{k}", sv)
        if self.scales:
            self.register_buffer("scale_mean", stats["scale_mean"].float().clone())
            self.register_buffer("scale_std", stats["scale_std"].float().clone())

    @staticmethod
    def _sep_conv(x: torch.Tensor, kh: torch.Tensor, kv: torch.Tensor, r: int, mode: str) -> torch.Tensor:
        """``anomaly_map._sep_conv`` with precomputed kernels."""
        groups = kh.shape[0]
        x = F.conv2d(F.pad(x, (r, r, 0, 0), mode=mode), kh, groups=groups)
        return F.conv2d(F.pad(x, (0, 0, r, r), mode=mode), kv, groups=groups)

    def _ssim(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        m = self._sep_conv(
            torch.cat([x, y, x * x, y * y, x * y], dim=1),
            self.ssim_kh,
            self.ssim_kv,
            self.ssim_pad,
            self.ssim_mode,
        )
        mx, my, xx, yy, xy = m.split(self.c, dim=1)
        vx, vy, cov = xx - mx * mx, yy - my * my, xy - mx * my
        return ((2 * mx * my + SSIM_C1) * (2 * cov + SSIM_C2)) / (
            (mx * mx + my * my + SSIM_C1) * (vx + vy + SSIM_C2)
        )

    def _pixel_map(self, x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        d = x - r
        m = torch.zeros_like(d)
        if self.l1:
            m = m + self.l1 * d.abs()
        if self.l2:
            m = m + self.l2 * d * d
        if self.ssim:
            m = m + self.ssim * 0.5 * (1.0 - self._ssim(x, r))
        return m.amax(1) if self.reduce_max else m.mean(1)

    def _blur(self, m: torch.Tensor) -> torch.Tensor:
        if self.sigma <= 0:
            return m
        out = self._sep_conv(m.unsqueeze(1), self.blur_kh, self.blur_kv, self.blur_pad, self.blur_mode)
        return out.squeeze(1)

    def _multiscale(self, raw: torch.Tensor) -> torch.Tensor:
        """``anomaly_map.multiscale_map`` with precomputed kernels."""
        out = None
        for k, (pad, mode) in enumerate(self.scale_pads):
            kh, kv = getattr(self, f"scale_kh{k}"), getattr(self, f"scale_kv{k}")
            b = self._sep_conv(raw.unsqueeze(1), kh, kv, pad, mode).squeeze(1)
            z = (b - self.scale_mean[k]) / self.scale_std[k]
            out = z if out is None else torch.maximum(out, z)
        return out

    def _score(self, amap: torch.Tensor, elbo: torch.Tensor) -> torch.Tensor:
        if self.score_kind == "elbo":
            return elbo
        b = self.border
        flat = (amap[:, b : self.h - b, b : self.w - b] if b else amap).reshape(amap.shape[0], -1)
        if self.score_kind == "topk_mean":
            return torch.topk(flat, self.topk, dim=1).values.mean(1)
        return flat.amax(1)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = images.float()
        mu, logvar = self.vae.encode(x)
        recon = self.vae.decode(mu).float()
        raw = self._pixel_map(x, recon)
        if self.fused:  # Inspector smooths first and takes the ELBO's map term from the smoothed map
            raw = self._blur(raw)
        elbo = raw.flatten(1).mean(1) + kl_divergence(mu.float(), logvar.float()) / self.numel
        if self.zmode == "map":
            raw = self._blur((raw - self.map_mean) / self.map_std)
        elif self.zmode == "score":  # plain map for masks, standardised one for the image score
            zmap = self._blur((raw - self.map_mean) / self.map_std)
            raw = self._multiscale(raw) if self.scales else self._blur(raw)
            return raw, self._score(zmap, elbo), elbo, zmap
        elif self.scales:
            raw = self._multiscale(raw)
        return raw, self._score(raw, elbo), elbo


# --------------------------------------------------------------------------------------------- metadata


def _meta_props(meta: ModelMeta, cfg: Config, export_info: dict[str, Any]) -> dict[str, str]:
    """The ``metadata_props`` of an exported file (every value a JSON document)."""
    cal = meta.calibration
    thr = {
        "image_threshold": (cal or {}).get("image_threshold"),
        "pixel_threshold": (cal or {}).get("pixel_threshold"),
        "score_scale": (cal or {}).get("score_scale"),
    }
    props = {
        "format": {"format": ONNX_FORMAT, "version": ONNX_FORMAT_VERSION},
        "model_id": meta.model_id,
        "config": cfg.model_dump(mode="json"),
        "preprocess": cfg.preprocess.model_dump(mode="json"),
        "calibration": cal,
        "thresholds": thr,
        "model": {
            "in_channels": meta.in_channels,
            "size": list(meta.size),
            "training": meta.training,
            "versions": meta.versions,
            "model_format_version": meta.format_version,
        },
        "export": export_info,
    }
    return {META_PREFIX + k: json.dumps(v, allow_nan=False) for k, v in props.items()}


def _parse_props(props: dict[str, str], path: Path) -> dict[str, Any]:
    """Decode the ``imganom.*`` metadata; raises ModelFileError when it is missing or malformed."""
    out: dict[str, Any] = {}
    for k, v in props.items():
        if k.startswith(META_PREFIX):
            try:
                out[k[len(META_PREFIX) :]] = json.loads(v)
            except json.JSONDecodeError as e:
                raise ModelFileError(f"{path}: metadata {k} is not valid JSON ({e})") from None
    fmt = out.get("format")
    if not isinstance(fmt, dict) or fmt.get("format") != ONNX_FORMAT:
        raise ModelFileError(f"{path}: ONNX file has no imganom metadata (not exported by imganom export)")
    if int(fmt.get("version", 0)) > ONNX_FORMAT_VERSION:
        raise ModelFileError(
            f"{path}: imganom ONNX format {fmt['version']} is newer than this imganom "
            f"supports ({ONNX_FORMAT_VERSION}); upgrade imganom"
        )
    missing = [k for k in ("config", "model", "thresholds") if not isinstance(out.get(k), dict)]
    if missing:
        raise ModelFileError(f"{path}: imganom metadata is missing {', '.join(missing)}")
    return out


def _meta_from_props(d: dict[str, Any], path: Path) -> ModelMeta:
    """A ``ModelMeta`` (what ``Inspector`` reads) from decoded metadata; ``thresholds`` wins over
    ``calibration`` so that a hand-edited file stays self-consistent."""
    cal = dict(d["calibration"]) if isinstance(d.get("calibration"), dict) else None
    thr = d["thresholds"]
    if thr.get("image_threshold") is not None or thr.get("pixel_threshold") is not None:
        cal = cal or {"source": "manual"}
        for k in ("image_threshold", "pixel_threshold", "score_scale"):
            if thr.get(k) is not None:
                cal[k] = thr[k]
    m = d["model"]
    meta = ModelMeta(
        config=d["config"],
        in_channels=int(m.get("in_channels", 0)),
        size=tuple(m.get("size", ())),
        training=m.get("training") or {},
        calibration=cal,
        versions=m.get("versions") or {},
        model_id=str(d.get("model_id") or ""),
        format_version=int(m.get("model_format_version", FORMAT_VERSION)),
    )
    try:
        cfg = meta.cfg
    except ValueError as e:
        raise ModelFileError(f"{path}: {e}") from None
    if tuple(cfg.preprocess.size) != meta.size or cfg.preprocess.channels != meta.in_channels:
        raise ModelFileError(f"{path}: metadata size/channels disagree with its config")
    return meta


def _load_proto(p: Path) -> Any:
    """The ModelProto of an exported file (external weight data, if any, is left where it is)."""
    import onnx

    if not p.is_file():
        raise ModelFileError(f"ONNX file not found: {p}")
    try:
        return onnx.load(str(p), load_external_data=False)
    except Exception as e:  # noqa: BLE001 - protobuf raises several types
        raise ModelFileError(f"{p}: not a readable ONNX file ({e})") from None


def read_onnx_meta(path: str | Path) -> dict[str, Any]:
    """The decoded ``imganom.*`` metadata of an exported file (keys without the prefix)."""
    p = Path(path)
    return _parse_props({x.key: x.value for x in _load_proto(p).metadata_props}, p)


def _save_onnx_atomic(model: Any, path: Path) -> None:
    import onnx

    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        onnx.save(model, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def update_onnx_thresholds(
    path: str | Path, image_threshold: float | None = None, pixel_threshold: float | None = None
) -> dict[str, Any]:
    """Set the thresholds of an exported file in place (metadata only; the graph is untouched).

    ``None`` keeps a value. Updates both ``imganom.thresholds`` and ``imganom.calibration``; returns the new
    thresholds dict. The file is rewritten atomically.
    """
    if image_threshold is None and pixel_threshold is None:
        raise ValueError("give image_threshold and/or pixel_threshold")
    for name, v in (("image_threshold", image_threshold), ("pixel_threshold", pixel_threshold)):
        if v is not None and not math.isfinite(v):
            raise ValueError(f"{name} must be finite, got {v}")
    p = Path(path)
    m = _load_proto(p)
    d = _parse_props({x.key: x.value for x in m.metadata_props}, p)
    thr = dict(d["thresholds"])
    cal = dict(d["calibration"]) if isinstance(d.get("calibration"), dict) else {"source": "manual"}
    for k, v in (("image_threshold", image_threshold), ("pixel_threshold", pixel_threshold)):
        if v is not None:
            thr[k] = cal[k] = float(v)
    cal["edited"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    new = {META_PREFIX + "thresholds": json.dumps(thr), META_PREFIX + "calibration": json.dumps(cal)}
    for prop in m.metadata_props:
        if prop.key in new:
            prop.value = new.pop(prop.key)
    for k, v in new.items():
        m.metadata_props.add(key=k, value=v)
    _save_onnx_atomic(m, p)
    return thr


# ------------------------------------------------------------------------------------------------ export


@dataclass
class ExportReport:
    """What ``export_onnx`` did."""

    path: Path
    opset: int
    exporter: str  # 'torchscript' or 'dynamo'
    seconds: float
    size_bytes: int
    max_rel_diff: float | None = None  # --check: max |onnx - torch| / max|map| over the check batches
    notes: list[str] = field(default_factory=list)


def _trace_export(graph: AnomalyGraph, example: torch.Tensor, path: Path, opset: int) -> str:
    """torch.onnx.export, TorchScript tracer first (fast, static kernels), the dynamo exporter as fallback."""
    names = dict(input_names=[INPUT_NAME], output_names=list(graph.output_names))
    axes = {INPUT_NAME: {0: "batch"}, **{n: {0: "batch"} for n in graph.output_names}}
    errors = []
    for dynamo in (False, True):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                if dynamo:
                    batch = torch.export.Dim("batch", min=1)
                    torch.onnx.export(
                        graph,
                        (example,),
                        str(path),
                        opset_version=opset,
                        dynamo=True,
                        dynamic_shapes={"images": {0: batch}},
                        verbose=False,
                        **names,
                    )
                else:
                    torch.onnx.export(
                        graph,
                        (example,),
                        str(path),
                        opset_version=opset,
                        dynamo=False,
                        dynamic_axes=axes,
                        do_constant_folding=True,
                        **names,
                    )
            return "dynamo" if dynamo else "torchscript"
        except Exception as e:  # noqa: BLE001 - try the other exporter, report both
            errors.append(f"{'dynamo' if dynamo else 'torchscript'}: {type(e).__name__}: {str(e)[:500]}")
    raise ExportError("ONNX export failed:\n  " + "\n  ".join(errors))


def _make_session(path: str | Path, providers: list[str] | None = None, threads: int | None = None) -> Any:
    import onnxruntime as ort

    so = ort.SessionOptions()
    if threads:
        so.intra_op_num_threads = int(threads)
        so.inter_op_num_threads = 1
    if providers is None:
        avail = ort.get_available_providers()
        providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in avail]
    return ort.InferenceSession(str(path), so, providers=providers)


def _parity(graph: AnomalyGraph, path: Path, cfg: Config, threads: int | None) -> float:
    """Max relative difference ONNX vs torch on batches of 1 and 3 (also exercises the dynamic batch axis)."""
    sess = _make_session(path, ["CPUExecutionProvider"], threads)
    gen = torch.Generator().manual_seed(0)
    c, (h, w) = cfg.preprocess.channels, cfg.preprocess.size
    worst = 0.0
    for n in (1, 3):
        # smooth random images in [0, 1]: closer to real inputs than white noise
        x = F.interpolate(torch.rand(n, c, h // 4, w // 4, generator=gen), size=(h, w), mode="bilinear")
        with torch.no_grad():
            ref = [t.numpy() for t in graph(x)]
        got = sess.run(list(graph.output_names), {INPUT_NAME: x.numpy()})
        for name, a, b in zip(graph.output_names, got, ref):
            if a.shape != b.shape:
                raise ExportError(f"check: {name} has shape {a.shape} for batch {n}, expected {b.shape}")
        scale = max(float(np.abs(ref[0]).max()), 1e-6)
        worst = max(
            worst,
            float(np.abs(got[0] - ref[0]).max()) / scale,
            float(np.abs(got[1] - ref[1]).max() / np.maximum(np.abs(ref[1]), 1e-6).max()),
        )
    return worst


def export_onnx(
    model_path: str | Path,
    out: str | Path,
    *,
    opset: int = DEFAULT_OPSET,
    check: bool = False,
    allow_mc: bool = False,
    threads: int | None = None,
) -> ExportReport:
    """Export a model file (or run directory) to ONNX with imganom metadata; validates with onnx.checker.

    ``check=True`` also runs onnxruntime against the torch graph (batches 1 and 3) and raises ExportError
    when the map differs by more than ``PARITY_RTOL`` of its max (``PARITY_RTOL_STANDARDIZED`` for a
    standardised map). Raises ModelFileError for a bad model file, UnsupportedModelError for an MC model
    without ``allow_mc``. The file appears atomically, only once every check passed.
    """
    import onnx

    t0 = time.perf_counter()
    src = resolve_model_path(model_path)
    model, meta, stats = load_model(src)
    cfg = meta.cfg
    notes: list[str] = []
    if cfg.map.mc_samples:
        if not allow_mc:
            raise UnsupportedModelError(
                f"map.mc_samples={cfg.map.mc_samples}: Monte-Carlo sampling is not exported; "
                "pass allow_mc (--allow-mc) to export the deterministic mean-decoding map"
            )
        notes.append(
            f"map.mc_samples={cfg.map.mc_samples} dropped: the graph decodes the posterior mean only"
        )
        cfg = cfg.model_copy(update={"map": cfg.map.model_copy(update={"mc_samples": 0})})
    if cfg.map.standardize != "off" and "map_mean" not in stats:
        notes.append("map.standardize is set but the model has no stats (uncalibrated): not standardised")
    if cfg.map.scales and "scale_mean" not in stats:
        notes.append("map.scales is set but the model has no scale stats (uncalibrated): single scale")
    graph = AnomalyGraph(model.float().cpu(), cfg, stats).eval()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        example = torch.rand(2, cfg.preprocess.channels, *cfg.preprocess.size)
        exporter = _trace_export(graph, example, tmp, opset)
        proto = onnx.load(str(tmp))
        info = {
            "opset": opset,
            "exporter": exporter,
            "torch": torch.__version__,
            "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "source": src.name,
            "input": {INPUT_NAME: ["batch", cfg.preprocess.channels, *cfg.preprocess.size]},
            "outputs": list(graph.output_names),
            "score": cfg.postprocess.score,
            "standardized": graph.standardize,
            "scales": graph.scales,
            "sigma": cfg.postprocess.sigma,
            "notes": notes,
        }
        del proto.metadata_props[:]
        for k, v in _meta_props(_with_config(meta, cfg), cfg, info).items():
            proto.metadata_props.add(key=k, value=v)
        proto.producer_name, proto.doc_string = "imganom", f"imganom anomaly graph, model {meta.model_id}"
        try:
            onnx.checker.check_model(proto, full_check=True)
        except onnx.checker.ValidationError as e:
            raise ExportError(f"exported graph failed onnx.checker: {e}") from None
        onnx.save(proto, str(tmp))
        diff = None
        if check:
            diff = _parity(graph, tmp, cfg, threads)
            tol = PARITY_RTOL_STANDARDIZED if graph.standardize or graph.scales else PARITY_RTOL
            if not diff <= tol:
                raise ExportError(
                    f"check failed: onnxruntime differs from torch by {diff:.3g} of the map max "
                    f"(tolerance {tol})"
                )
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return ExportReport(out, opset, exporter, time.perf_counter() - t0, out.stat().st_size, diff, notes)


def _with_config(meta: ModelMeta, cfg: Config) -> ModelMeta:
    d = asdict(meta)
    d["config"] = cfg.model_dump(mode="json")
    return ModelMeta(**d)


# ----------------------------------------------------------------------------------------- OnnxInspector


class OnnxInspector(Inspector):
    """``Inspector`` whose device work runs an exported graph in onnxruntime; same ``Result`` objects.

    Decoding, geometry (stretch/letterbox/tiles), resampling to the original size, scoring, ROI, masks and
    regions are ``Inspector``'s own code; only ``model_maps`` differs. No torch model is loaded
    (``self.model is None``); map settings are baked into the graph, so changing ``cfg.map`` or
    ``cfg.postprocess.sigma`` afterwards (e.g. ``calibrate.map_statistics``) raises RuntimeError.
    """

    def __init__(
        self,
        session: Any,
        meta: ModelMeta,
        *,
        image_threshold: float | None = None,
        pixel_threshold: float | None = None,
        threshold_source: str = "normal",
        roi: np.ndarray | None = None,
        maps: str = "all",
        path: Path | None = None,
        export_info: dict | None = None,
    ) -> None:
        # Inspector.__init__ needs a ConvVAE: set the attributes its methods use here instead (host-side
        # post-processing, no compiled model, no adaptive device batching: onnxruntime takes any batch).
        if maps not in ("all", "ng", "none"):
            raise ValueError(f"maps must be 'all', 'ng' or 'none', got {maps!r}")
        self.meta, self.cfg = meta, meta.cfg
        self.device, self.amp, self.model, self.stats = torch.device("cpu"), None, None, {}
        self.maps, self.device_postprocess, self._adaptive, self._compiled = maps, False, None, None
        self._roi_cache: dict = {}
        self.roi = roi
        self._lock = threading.Lock()
        self._set_thresholds(meta, image_threshold, pixel_threshold, threshold_source)
        self.session, self.path, self.export_info = session, path, export_info or {}
        self._baked = self._map_settings()
        self._check_io()

    def _map_settings(self) -> tuple[str, float]:
        sigma = float(self.cfg.postprocess.sigma)
        return json.dumps(self.cfg.map.model_dump(mode="json"), sort_keys=True), sigma

    def _check_io(self) -> None:
        ins, outs = self.session.get_inputs(), {o.name for o in self.session.get_outputs()}
        want = [self.cfg.preprocess.channels, *self.cfg.preprocess.size]
        if len(ins) != 1 or ins[0].name != INPUT_NAME or list(ins[0].shape[1:]) != want:
            got = [(i.name, i.shape) for i in ins]
            raise ModelFileError(
                f"{self.path}: graph input {got} does not match the metadata ({INPUT_NAME} {want})"
            )
        if not {"anomaly_map", "elbo"} <= outs:
            raise ModelFileError(f"{self.path}: graph outputs {sorted(outs)} lack anomaly_map/elbo")

    @classmethod
    def load(
        cls, path: str | Path, providers: list[str] | None = None, *, threads: int | None = None, **kw: Any
    ) -> OnnxInspector:
        """Open an exported file; ``providers`` as for onnxruntime (default: CUDA if available, then CPU),
        ``threads`` = intra-op threads (None: onnxruntime's default); ``image_threshold``,
        ``pixel_threshold``, ``threshold_source`` and ``roi`` as for ``Inspector``."""
        kw.pop("device", None)  # accepted for signature compatibility with Inspector.load
        kw.pop("precision", None)
        p = Path(path)
        if not p.is_file():
            raise ModelFileError(f"ONNX file not found: {p}")
        try:
            sess = _make_session(p, providers, threads)
        except Exception as e:  # noqa: BLE001 - onnxruntime raises its own exception types
            raise ModelFileError(f"{p}: onnxruntime cannot load it ({str(e)[:300]})") from None
        d = _parse_props(dict(sess.get_modelmeta().custom_metadata_map), p)
        return cls(sess, _meta_from_props(d, p), path=p, export_info=d.get("export"), **kw)

    @property
    def standardize_mode(self) -> str:
        """"score" when the graph has a ``score_map`` output; a "map" graph standardises its map itself."""
        return "score" if "score_map" in {o.name for o in self.session.get_outputs()} else "off"

    @torch.no_grad()
    def model_maps_scored(
        self, views: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Views (N, C, h, w) -> smoothed maps (N, h, w), ELBO (N,) and score maps (or None) from
        onnxruntime (float32, CPU)."""
        if self._map_settings() != self._baked:
            raise RuntimeError(
                "map settings are baked into the ONNX graph; use the torch model to change them"
            )
        x = np.ascontiguousarray(views.detach().cpu().numpy(), dtype=np.float32)
        scored = self.standardize_mode == "score"
        out = self.session.run(["anomaly_map", "elbo"] + (["score_map"] if scored else []), {INPUT_NAME: x})
        smaps = torch.from_numpy(out[2]) if scored else None
        return torch.from_numpy(out[0]), torch.from_numpy(out[1]), smaps


def load_inspector(path: str | Path, **kw: Any) -> Inspector:
    """``OnnxInspector.load`` for ``.onnx`` files, else ``Inspector.load`` (same keyword arguments)."""
    if str(path).lower().endswith(".onnx"):
        return OnnxInspector.load(path, **kw)
    return Inspector.load(path, **kw)
