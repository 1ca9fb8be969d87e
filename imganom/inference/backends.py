"""The Inspector's backends: a batch of model-sized views in, ``HeadOutput`` (maps, ELBO, score maps) out.

* ``TorchBackend``: the ConvVAE on a torch device (autocast, optional ``torch.compile``) followed by the
  ``AnomalyHead`` (map term on the fused Triton kernels on CUDA, Monte-Carlo draws, standardisation,
  smoothing). Calibration's raw maps come from here too.
* ``GraphBackend``s run the inspection graph (``formats.onnxgraph``: the same VAE + head, traced; an
  ``imganom export`` file or a ``.safetensors`` model traced on load, ``inference.graphs``):
  ``OnnxBackend`` in onnxruntime, ``OpenVinoBackend`` compiled by OpenVINO for the CPU. Their map settings
  and statistics are baked into the graph: no raw maps, no new statistics.

Each holds a lock that serialises its device work, shared by every Inspector made from it.
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
    REFERENCE,
    SCORE_MAP,
    model_meta_from_onnx,
    open_session,
    parse_onnx_props,
    read_onnx_meta,
)
from imganom.formats.openvinoir import ir_props, is_ir, openvino_core, read_ir_model
from imganom.inference.compiled import CompiledVAE, keep_output_layer_fp32
from imganom.models.vae import ConvVAE, kl_divergence
from imganom.ops.head import AnomalyHead, HeadOutput
from imganom.utils.device import autocast_dtype, resolve_device


class HeadOutputWithExtra(HeadOutput):
    """A ``HeadOutput`` (the same 3-tuple: code that unpacks it is unaffected) with ``extra``, the torch
    backend's per-view side outputs (``inference.extras``): latent means, the ELBO's KL term, Monte-Carlo
    samples. Graph backends return a plain ``HeadOutput`` (``extras_of`` gives None)."""

    def __new__(cls, out: HeadOutput, extra: dict[str, torch.Tensor]) -> HeadOutputWithExtra:
        self = super().__new__(cls, *out)
        self.extra = extra
        return self


def extras_of(out: HeadOutput) -> dict[str, torch.Tensor] | None:
    """The side outputs of a backend's ``HeadOutput`` (None from a graph backend)."""
    return getattr(out, "extra", None)


class TorchBackend:
    """A ConvVAE and its ``AnomalyHead`` on ``device``; ``precision`` as ``utils.device.autocast_dtype``.

    ``compile``: ``torch.compile`` encode + decode (``compile_mode``, default ``"reduce-overhead"`` = CUDA
    graphs on CUDA, batches padded to one fixed size). ``stats``: the model's normal-map statistics.
    """

    kind = "torch"
    selection: dict[str, Any] | None = None  # how ``backend="auto"`` chose this one (inference.loader)

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

    def with_stats(self, stats: Mapping[str, torch.Tensor], replace: bool = False) -> TorchBackend:
        """The same model (and lock) with these normal-map statistics added to the current ones (instead
        of them with ``replace``)."""
        new = copy.copy(self)
        old = {} if replace else self.stats
        new.stats = {**old, **{k: v.to(self.device) for k, v in stats.items()}}
        new.head = AnomalyHead(self.cfg, new.stats).to(self.device)
        return new

    def _autocast(self) -> torch.autocast:
        return torch.autocast(self.device.type, dtype=self.amp, enabled=self.amp is not None)

    def _forward(
        self, views: torch.Tensor
    ) -> tuple[torch.Tensor, Iterator[torch.Tensor], torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """(x on the device, its reconstructions one at a time: posterior mean then MC draws, KL per view,
        the posterior (mu, logvar))."""
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
                    yield self._decode_sample(mu, logvar, gen)  # the map is computed in fp32

        return x, recons(), kl_divergence(mu.float(), logvar.float()), (mu, logvar)

    def _decode_sample(self, mu: torch.Tensor, logvar: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """One reparameterised draw per row of ``mu``, decoded (under autocast)."""
        with self._autocast():
            return self.model.decode(self.model.sample(mu, logvar, generator=gen))

    def _sampled(
        self, x: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor, kl: torch.Tensor, k: int
    ) -> dict[str, torch.Tensor]:
        """``k`` latent draws per view in one decoder batch -> their head outputs (``sample_maps``
        (k, N, h, w), ``sample_score_maps`` or absent, ``sample_elbo`` (k, N)) and the per-pixel standard
        deviation of the k reconstructions, channel-averaged (``recon_std`` (N, h, w)). Seeded: the same
        views give the same draws."""
        n = x.shape[0]
        gen = torch.Generator(device=self.device).manual_seed(1)
        rep = (k,) + (1,) * (mu.dim() - 1)
        recon = self._decode_sample(mu.repeat(rep), logvar.repeat(rep), gen).float()
        xk = x.repeat(k, 1, 1, 1)
        out = self.head.finish(self.head.raw_map(xk, [recon]), kl.repeat(k), xk)
        h, w = out.maps.shape[-2:]
        ext = {
            "sample_maps": out.maps.reshape(k, n, h, w),
            "sample_elbo": out.elbo.reshape(k, n),
            "recon_std": recon.reshape(k, n, *recon.shape[1:]).std(0).mean(1),
        }
        if out.score_maps is not None:
            ext["sample_score_maps"] = out.score_maps.reshape(k, n, h, w)
        return ext

    @torch.no_grad()
    def maps(self, views: torch.Tensor, samples: int = 1) -> HeadOutput:
        """Views (N, C, h, w) on any device -> smoothed model-resolution maps (N, h, w) fp32 on the device,
        the per-view negative ELBO and, with ``map.standardize == "score"``, the score maps. ``extra``: the
        latent means (N, D; spatial latents averaged over space), the ELBO's KL term (KL / (C*H*W), N) and,
        with ``samples`` >= 2, ``_sampled``'s Monte-Carlo outputs; the maps do not depend on ``samples``."""
        x, recons, kl, (mu, logvar) = self._forward(views)
        out = self.head.finish(self.head.raw_map(x, recons), kl, x)
        out = out._replace(reference=self.head.reference_of(mu))
        latent = mu.float().flatten(1) if mu.dim() == 2 else mu.float().mean((2, 3))
        extra = {"latent": latent, "kl_term": kl / self.head.numel}
        if samples >= 2:
            extra.update(self._sampled(x, mu, logvar, kl, samples))
        return HeadOutputWithExtra(out, extra)

    @torch.no_grad()
    def raw_maps(self, views: torch.Tensor) -> torch.Tensor:
        """Unsmoothed, unstandardised single-scale maps (N, h, w) (Monte-Carlo mean included): what the
        normal-map statistics are measured on."""
        x, recons, _, _ = self._forward(views)
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


class GraphBackend:
    """What the graph runtimes share: an exported (or traced) inspection graph whose map settings and
    statistics are baked in; results come back to the host (``device`` is the CPU, where post-processing
    runs). ``runtime``: the runtime's session / compiled model; subclasses give ``_load``, ``_io`` and
    ``_run``. ``export_info``: the file's ``imganom.export`` metadata (``scales``); ``threads``: the runtime's
    intra-op threads; ``precision``: the runtime's spelling ("f32" unless asked)."""

    kind = "graph"
    model = None  # no torch model
    amp: torch.dtype | None = None  # fp32 graph
    selection: dict[str, Any] | None = None  # how ``backend="auto"`` chose this one (inference.loader)

    def __init__(
        self,
        runtime: Any,
        cfg: Config,
        path: Path | None = None,
        export_info: dict | None = None,
        threads: int | None = None,
        precision: str = "f32",
    ):
        self.runtime, self.cfg, self.path, self.threads, self.precision = (
            runtime,
            cfg,
            path,
            threads,
            precision,
        )
        self.export_info = export_info or {}
        self.device = torch.device("cpu")
        self.stats: dict[str, torch.Tensor] = {}
        self.lock = threading.Lock()
        inputs, outputs = self._io()
        want = [cfg.preprocess.channels, *cfg.preprocess.size]
        if len(inputs) != 1 or inputs[0][0] != INPUT_NAME or list(inputs[0][1][1:]) != want:
            raise ModelFileError(
                f"{path}: graph input {inputs} does not match the metadata ({INPUT_NAME} {want})"
            )
        if not {"anomaly_map", "elbo"} <= set(outputs):
            raise ModelFileError(f"{path}: graph outputs {sorted(outputs)} lack anomaly_map/elbo")
        self._outputs = ["anomaly_map", "elbo"] + ([SCORE_MAP] if SCORE_MAP in outputs else [])
        self._outputs += [REFERENCE] if REFERENCE in outputs else []

    @classmethod
    def open(
        cls,
        path: str | Path,
        device: str = "auto",
        threads: int | None = None,
        meta: ModelMeta | None = None,
        export_info: dict | None = None,
        precision: str = "auto",
    ) -> tuple[GraphBackend, ModelMeta]:
        """Open an exported file: (backend, the model metadata it carries; ``meta``/``export_info`` when
        given, for a bare traced graph). ``threads``: the runtime's intra-op threads (None: its default).
        Raises ImportError without the runtime, ValueError for a device or precision it cannot run, and
        ModelFileError for a missing or foreign file."""
        p = Path(path)
        if not p.is_file():
            raise ModelFileError(f"{'OpenVINO IR' if is_ir(p) else 'ONNX file'} not found: {p}")
        runtime, props = cls._load(p, device, threads, precision)
        if meta is None:
            d = parse_onnx_props(props, p) if props is not None else read_onnx_meta(p)
            meta, export_info = model_meta_from_onnx(d, p), d.get("export")
        cls._check(meta, precision)
        be = cls(runtime, meta.cfg, p, export_info, threads, OPENVINO_PRECISIONS[precision])
        if meta.cfg.calibration.neighbours and meta.calibration and REFERENCE not in be._outputs:
            raise ModelFileError(f"{p}: the model's thresholds are on scores relative to its nearest normals "
                                 "(calibration.neighbours) but the graph has no 'reference' output: export "
                                 "the model again with this version")  # fmt: skip
        return be, meta

    @classmethod
    def _load(cls, path: Path, device: str, threads: int | None, precision: str) -> tuple[Any, dict | None]:
        """(the runtime's session for ``path``, the file's metadata props if the runtime read them)."""
        raise NotImplementedError

    @classmethod
    def _check(cls, meta: ModelMeta, precision: str) -> None:
        """Raise ValueError when this runtime cannot run the model at ``precision``."""
        if precision not in ("auto", "fp32"):
            raise ValueError(f"precision {precision!r}: the {cls.kind} backend runs the graph in fp32")

    def _io(self) -> tuple[list[tuple[str, list]], list[str]]:
        """([(input name, shape)], output names) of the graph in ``runtime``."""
        raise NotImplementedError

    def _run(self, x: np.ndarray) -> list[np.ndarray]:
        """float32 (N, C, h, w) -> the ``self._outputs`` arrays."""
        raise NotImplementedError

    @property
    def standardize_mode(self) -> str:
        """``score`` when the graph has a ``score_map`` output (a "map" graph standardises its map itself)."""
        return "score" if SCORE_MAP in self._outputs else "off"

    @property
    def scale_sigmas(self) -> list[float]:
        """The smoothing scales baked into the graph (export metadata)."""
        return list(self.export_info.get("scales") or [])

    def with_stats(self, stats: Mapping[str, torch.Tensor], replace: bool = False) -> GraphBackend:
        raise RuntimeError(
            "normal-map statistics are baked into the ONNX graph; recalibrate the .safetensors model "
            "and export it again"
        )

    def maps(self, views: torch.Tensor, samples: int = 1) -> HeadOutput:
        """Views (N, C, h, w) -> smoothed maps (N, h, w), ELBO (N,) and score maps (or None), float32 CPU.
        The graph is deterministic and has no latent outputs: no ``extra`` (no uncertainty, latents or ELBO
        decomposition), whatever ``samples``."""
        x = np.ascontiguousarray(views.detach().cpu().numpy(), dtype=np.float32)
        out = dict(zip(self._outputs, (torch.from_numpy(o) for o in self._run(x))))
        return HeadOutput(out["anomaly_map"], out["elbo"], out.get(SCORE_MAP), out.get(REFERENCE))

    def raw_maps(self, views: torch.Tensor) -> torch.Tensor:
        raise RuntimeError(
            "an ONNX graph gives only its final maps; measure normal-map statistics on the .safetensors"
        )


class OnnxBackend(GraphBackend):
    """The graph in an onnxruntime session (CPU, or CUDA with onnxruntime-gpu)."""

    kind = "onnxruntime"

    @property
    def session(self) -> Any:
        """The onnxruntime ``InferenceSession``."""
        return self.runtime

    @classmethod
    def _load(cls, path: Path, device: str, threads: int | None, precision: str) -> tuple[Any, dict | None]:
        sess = open_session(path, onnx_providers(device), threads)
        return sess, dict(sess.get_modelmeta().custom_metadata_map)

    def _io(self) -> tuple[list[tuple[str, list]], list[str]]:
        return [(i.name, i.shape) for i in self.runtime.get_inputs()], [
            o.name for o in self.runtime.get_outputs()
        ]

    def _run(self, x: np.ndarray) -> list[np.ndarray]:
        return self.runtime.run(self._outputs, {INPUT_NAME: x})


OPENVINO_PRECISIONS = {"auto": "f32", "fp32": "f32", "bf16": "bf16", "fp16": "f16"}
_OV_AMP = {"bf16": torch.bfloat16, "f16": torch.float16}


class OpenVinoBackend(GraphBackend):
    """The graph compiled by OpenVINO for the CPU (``pip install 'imganom[openvino]'``), from the ONNX file
    or an imganom OpenVINO IR (``.xml``: fp32, or INT8 weights from ``imganom export --format openvino
    --int8``, whose quantised layers run in INT8 whatever ``precision`` says).

    ``precision``: "auto"/"fp32" run in fp32 (OpenVINO would otherwise pick bf16 on CPUs with AMX/AVX512-BF16
    and move maps by ~2 % of their max); "bf16"/"fp16" ask for that inference precision explicitly, for maps
    without an SSIM term only (magnetic_tile, L1 map, bf16: scores within 2.5 %, no verdict changed).
    The latency hint: one request uses every thread, as the Inspector sends one batch at a time.
    """

    kind = "openvino"

    def __init__(self, runtime: Any, cfg: Config, *args: Any, **kw: Any):
        super().__init__(runtime, cfg, *args, **kw)
        self.amp = _OV_AMP.get(self.precision)
        self.weights = "int8" if self.export_info.get("int8") else None  # an INT8 IR (export --int8)
        self.request = runtime.create_infer_request()
        self._ports = [runtime.output(n) for n in self._outputs]

    @classmethod
    def _load(cls, path: Path, device: str, threads: int | None, precision: str) -> tuple[Any, dict | None]:
        if device not in ("auto", "cpu"):
            raise ValueError(f"device {device!r}: the openvino backend runs on the CPU ('cpu' or 'auto')")
        if precision not in OPENVINO_PRECISIONS:
            raise ValueError(f"precision must be one of {sorted(OPENVINO_PRECISIONS)}, got {precision!r}")

        cfg = {"INFERENCE_PRECISION_HINT": OPENVINO_PRECISIONS[precision], "PERFORMANCE_HINT": "LATENCY"}
        if threads:
            cfg["INFERENCE_NUM_THREADS"] = int(threads)
        model, props = str(path), None
        if is_ir(path):  # an imganom IR (fp32 or INT8 weights): its metadata is in the rt_info
            model = read_ir_model(path)
            props = ir_props(model)
            if not props:
                raise ModelFileError(f"{path}: OpenVINO IR without imganom metadata")
        try:
            return openvino_core().compile_model(model, "CPU", cfg), props
        except Exception as e:  # noqa: BLE001 - OpenVINO raises its own exception types
            raise ModelFileError(f"{path}: openvino cannot compile it ({str(e)[:300]})") from None

    @classmethod
    def _check(cls, meta: ModelMeta, precision: str) -> None:
        if OPENVINO_PRECISIONS[precision] != "f32" and meta.cfg.map.ssim > 0:
            raise ValueError(
                f"precision {precision!r}: the map has an SSIM term, whose variances E[x^2] - E[x]^2 cancel "
                "in 16-bit floats (maps off by up to 10x measured); use fp32 (the default)"
            )

    def _io(self) -> tuple[list[tuple[str, list]], list[str]]:
        def name(port: Any) -> str:  # a port has every name of its tensor; the graph's own is among them
            return INPUT_NAME if INPUT_NAME in port.get_names() else port.get_any_name()

        ins = [(name(i), [d.get_length() if d.is_static else -1 for d in i.get_partial_shape()])
               for i in self.runtime.inputs]  # fmt: skip
        return ins, sorted({n for o in self.runtime.outputs for n in o.get_names()})

    def _run(self, x: np.ndarray) -> list[np.ndarray]:
        out = self.request.infer({INPUT_NAME: x})  # copies the outputs (share_outputs=False)
        return [np.asarray(out[p]) for p in self._ports]
