"""The Inspector's backends: a batch of model-sized views in, ``HeadOutput`` (maps, ELBO, score maps) out.

* ``TorchBackend``: the ConvVAE on a torch device (autocast, optional ``torch.compile``) followed by the
  ``AnomalyHead`` (map term on the fused Triton kernels on CUDA, Monte-Carlo draws, standardisation,
  smoothing). Calibration's raw maps come from here too.
* ``OnnxBackend``: an exported graph (``imganom export``: the same VAE + head, traced) in onnxruntime. Its
  map settings and statistics are baked into the graph: no raw maps, no new statistics.

Both hold a lock that serialises their device work, shared by every Inspector made from them.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from imganom.config import Config
from imganom.formats.modelfile import ModelFileError, ModelMeta
from imganom.formats.onnxfile import (
    INPUT_NAME,
    SCORE_MAP,
    model_meta_from_onnx,
    open_session,
    parse_onnx_props,
)
from imganom.inference.compiled import CompiledVAE, keep_output_layer_fp32
from imganom.models.vae import ConvVAE, kl_divergence
from imganom.ops.head import AnomalyHead, HeadOutput
from imganom.utils.device import autocast_dtype, resolve_device


class TorchBackend:
    """A ConvVAE and its ``AnomalyHead`` on ``device``; ``precision`` as ``utils.device.autocast_dtype``.

    ``compile``: ``torch.compile`` encode + decode (``compile_mode``, default ``"reduce-overhead"`` = CUDA
    graphs on CUDA, batches padded to one fixed size). ``stats``: the model's normal-map statistics.
    """

    kind = "torch"

    def __init__(
        self,
        model: ConvVAE,
        cfg: Config,
        stats: Mapping[str, torch.Tensor] | None = None,
        *,
        device: str = "auto",
        precision: str = "auto",
        compile: bool = False,
        compile_mode: str | None = None,
    ):
        self.cfg = cfg
        self.device = resolve_device(device)
        self.amp = autocast_dtype(precision, self.device)
        self.model = model.to(self.device).eval()
        if self.device.type == "cuda":
            self.model = self.model.to(memory_format=torch.channels_last)
        keep_output_layer_fp32(self.model)  # bf16/fp16 autocast: reconstruction in fp32 (no-op without)
        self.compiled: CompiledVAE | None = None
        if compile:
            mode = compile_mode or ("reduce-overhead" if self.device.type == "cuda" else None)
            self.compiled = CompiledVAE(self.model, mode)
        self.stats = {k: v.to(self.device) for k, v in (stats or {}).items()}
        self.head = AnomalyHead(cfg, self.stats).to(self.device)
        self.lock = threading.Lock()

    @property
    def standardize_mode(self) -> str:
        """``cfg.map.standardize`` where the model has the normal-map statistics, else "off"."""
        return self.head.standardize

    @property
    def scale_sigmas(self) -> list[float]:
        """Smoothing scales of the multi-scale map ([] = single scale, also while uncalibrated)."""
        return list(self.head.scales)

    def with_stats(self, stats: Mapping[str, torch.Tensor]) -> TorchBackend:
        """The same model (and lock) with these normal-map statistics added to the current ones."""
        new = copy.copy(self)
        new.stats = {**self.stats, **{k: v.to(self.device) for k, v in stats.items()}}
        new.head = AnomalyHead(self.cfg, new.stats).to(self.device)
        return new

    def _autocast(self) -> torch.autocast:
        return torch.autocast(self.device.type, dtype=self.amp, enabled=self.amp is not None)

    def _forward(self, views: torch.Tensor) -> tuple[torch.Tensor, Iterator[torch.Tensor], torch.Tensor]:
        """(x on the device, its reconstructions one at a time: posterior mean then MC draws, KL per view)."""
        x = views.to(self.device, non_blocking=True)
        if self.device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        with self._autocast():
            mu, logvar, recon = self.compiled(x) if self.compiled is not None else self.model.reconstruct(x)

        def recons() -> Iterator[torch.Tensor]:
            yield recon
            if self.head.mc_samples:
                gen = torch.Generator(device=self.device).manual_seed(0)
                for _ in range(self.head.mc_samples):
                    with self._autocast():
                        r = self.model.decode(self.model.sample(mu, logvar, generator=gen))
                    yield r  # outside autocast: the map is computed in fp32

        return x, recons(), kl_divergence(mu.float(), logvar.float())

    @torch.no_grad()
    def maps(self, views: torch.Tensor) -> HeadOutput:
        """Views (N, C, h, w) on any device -> smoothed model-resolution maps (N, h, w) fp32 on the device,
        the per-view negative ELBO and, with ``map.standardize == "score"``, the score maps."""
        x, recons, kl = self._forward(views)
        return self.head.finish(self.head.raw_map(x, recons), kl)

    @torch.no_grad()
    def raw_maps(self, views: torch.Tensor) -> torch.Tensor:
        """Unsmoothed, unstandardised single-scale maps (N, h, w) (Monte-Carlo mean included): what the
        normal-map statistics are measured on."""
        x, recons, _ = self._forward(views)
        return self.head.raw_map(x, recons, smooth=False)


def onnx_providers(device: str) -> list[str]:
    """onnxruntime execution providers for an Inspector ``device``: "auto" = CUDA when onnxruntime has it,
    then CPU; "cpu"; "cuda[:N]" (ValueError when this onnxruntime has no CUDA provider)."""
    import onnxruntime as ort

    avail = ort.get_available_providers()
    kind = torch.device(device).type if device != "auto" else "auto"
    if kind == "cpu":
        return ["CPUExecutionProvider"]
    if kind == "cuda" and "CUDAExecutionProvider" not in avail:
        raise ValueError("device cuda: this onnxruntime has no CUDAExecutionProvider (onnxruntime-gpu)")
    if kind not in ("auto", "cuda"):
        raise ValueError(f"device {device!r}: .onnx models run on 'cpu' or 'cuda' (onnxruntime)")
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in avail]


class OnnxBackend:
    """An exported graph in an onnxruntime session; results come back to the host (``device`` is the CPU,
    where post-processing runs). ``export_info``: the file's ``imganom.export`` metadata."""

    kind = "onnx"
    model = None  # no torch model
    amp = None  # the graph is fp32

    def __init__(self, session: Any, cfg: Config, path: Path | None = None, export_info: dict | None = None):
        self.session, self.cfg, self.path = session, cfg, path
        self.export_info = export_info or {}
        self.device = torch.device("cpu")
        self.stats: dict[str, torch.Tensor] = {}
        self.lock = threading.Lock()
        ins, outs = session.get_inputs(), [o.name for o in session.get_outputs()]
        want = [cfg.preprocess.channels, *cfg.preprocess.size]
        if len(ins) != 1 or ins[0].name != INPUT_NAME or list(ins[0].shape[1:]) != want:
            got = [(i.name, i.shape) for i in ins]
            raise ModelFileError(
                f"{path}: graph input {got} does not match the metadata ({INPUT_NAME} {want})"
            )
        if not {"anomaly_map", "elbo"} <= set(outs):
            raise ModelFileError(f"{path}: graph outputs {sorted(outs)} lack anomaly_map/elbo")
        self._outputs = ["anomaly_map", "elbo"] + ([SCORE_MAP] if SCORE_MAP in outs else [])

    @classmethod
    def open(
        cls, path: str | Path, device: str = "auto", threads: int | None = None
    ) -> tuple[OnnxBackend, ModelMeta]:
        """Open an exported file: (backend, the model metadata it carries). ``threads``: onnxruntime's
        intra-op threads (None: its default). Raises ModelFileError for a missing or foreign file."""
        p = Path(path)
        if not p.is_file():
            raise ModelFileError(f"ONNX file not found: {p}")
        sess = open_session(p, onnx_providers(device), threads)
        d = parse_onnx_props(dict(sess.get_modelmeta().custom_metadata_map), p)
        meta = model_meta_from_onnx(d, p)
        return cls(sess, meta.cfg, p, d.get("export")), meta

    @property
    def standardize_mode(self) -> str:
        """``score`` when the graph has a ``score_map`` output (a "map" graph standardises its map itself)."""
        return "score" if SCORE_MAP in self._outputs else "off"

    @property
    def scale_sigmas(self) -> list[float]:
        """The smoothing scales baked into the graph (export metadata)."""
        return list(self.export_info.get("scales") or [])

    def with_stats(self, stats: Mapping[str, torch.Tensor]) -> OnnxBackend:
        raise RuntimeError(
            "normal-map statistics are baked into the ONNX graph; recalibrate the .safetensors model "
            "and export it again"
        )

    def maps(self, views: torch.Tensor) -> HeadOutput:
        """Views (N, C, h, w) -> smoothed maps (N, h, w), ELBO (N,) and score maps (or None), float32 CPU."""
        x = np.ascontiguousarray(views.detach().cpu().numpy(), dtype=np.float32)
        out = [torch.from_numpy(o) for o in self.session.run(self._outputs, {INPUT_NAME: x})]
        return HeadOutput(out[0], out[1], out[2] if len(out) > 2 else None)

    def raw_maps(self, views: torch.Tensor) -> torch.Tensor:
        raise RuntimeError(
            "an ONNX graph gives only its final maps; measure normal-map statistics on the .safetensors"
        )
