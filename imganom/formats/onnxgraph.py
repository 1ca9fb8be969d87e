"""The inspection graph and its tracing into ONNX, shared by ``imganom export`` and the Inspector's graph
backends (onnxruntime, OpenVINO), which trace a ``.safetensors`` model themselves.

``InspectionGraph`` has one input ``images`` (N, C, h, w) float32, preprocessed, with a dynamic batch axis,
and the ``AnomalyHead``'s outputs (``anomaly_map``, ``score``, ``elbo`` and ``score_map`` with
``map.standardize = "score"``). ``trace_onnx`` writes it to a file without metadata; ``export.onnx`` adds the
``imganom.*`` metadata, checks and parity on top.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn

from imganom.formats.onnxfile import INPUT_NAME
from imganom.models.vae import ConvVAE, kl_divergence
from imganom.ops.head import AnomalyHead

DEFAULT_OPSET = 18


class GraphTraceError(RuntimeError):
    """Neither ONNX exporter could trace the graph."""


class InspectionGraph(nn.Module):
    """What is traced: ``images`` -> VAE (posterior mean) -> ``AnomalyHead`` outputs (``output_names``)."""

    def __init__(self, vae: ConvVAE, head: AnomalyHead):
        super().__init__()
        self.vae, self.head = vae, head
        self.output_names = head.output_names
        self.eval()  # torch.onnx.export restores this mode afterwards: eval, or BatchNorm uses batch stats

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x = images.float()
        mu, logvar, recon = self.vae.reconstruct(x)
        return self.head(x, recon.float(), kl_divergence(mu.float(), logvar.float()), mu)


def trace_onnx(
    graph: InspectionGraph, example: torch.Tensor, path: str | Path, opset: int = DEFAULT_OPSET
) -> str:
    """``torch.onnx.export`` of ``graph`` to ``path`` with a dynamic batch axis: the TorchScript tracer first
    (fast, static kernels), the dynamo exporter as fallback. Returns which one worked ("torchscript" or
    "dynamo"); raises GraphTraceError with both reasons when neither did."""
    names = dict(input_names=[INPUT_NAME], output_names=list(graph.output_names))
    axes = {INPUT_NAME: {0: "batch"}, **{n: {0: "batch"} for n in graph.output_names}}
    errors = []
    for dynamo in (False, True):
        if dynamo:
            batch = torch.export.Dim("batch", min=1)
            kw = dict(dynamo=True, verbose=False, dynamic_shapes={INPUT_NAME: {0: batch}})
        else:
            kw = dict(dynamo=False, dynamic_axes=axes, do_constant_folding=True)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.onnx.export(graph, (example,), str(path), opset_version=opset, **kw, **names)
            return "dynamo" if dynamo else "torchscript"
        except Exception as e:  # noqa: BLE001 - try the other exporter, report both
            errors.append(f"{'dynamo' if dynamo else 'torchscript'}: {type(e).__name__}: {str(e)[:500]}")
    raise GraphTraceError("ONNX export failed:\n  " + "\n  ".join(errors))
