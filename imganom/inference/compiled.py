"""How the VAE runs on the device: its output layer in fp32 under autocast, and ``CompiledVAE`` =
``torch.compile``'d encode + decode; with CUDA graphs (``reduce-overhead``) batches are padded to one fixed
size so graphs are replayed, not re-captured."""

from __future__ import annotations

import torch

from imganom.inference.pipeline import is_oom


class _FP32ConvTranspose2d(torch.nn.ConvTranspose2d):
    """``ConvTranspose2d`` that runs in fp32 under autocast (see ``keep_output_layer_fp32``)."""

    def forward(self, input: torch.Tensor, output_size: list[int] | None = None) -> torch.Tensor:
        with torch.autocast(input.device.type, enabled=False):
            return super().forward(input.float(), output_size)


class _FP32Conv2d(torch.nn.Conv2d):
    """``Conv2d`` that runs in fp32 under autocast (see ``keep_output_layer_fp32``)."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        with torch.autocast(input.device.type, enabled=False):
            return super().forward(input.float())


_FP32_LAYERS: dict[type, type] = {
    torch.nn.ConvTranspose2d: _FP32ConvTranspose2d,
    torch.nn.Conv2d: _FP32Conv2d,
}


def keep_output_layer_fp32(model: torch.nn.Module) -> bool:
    """Run the decoder's last layer (and so the sigmoid after it) in fp32 under autocast; idempotent.

    bf16 keeps 8 significant bits: a bf16 reconstruction is off by up to ~2e-3 from rounding alone, which
    the L1 and SSIM terms pass straight into the map. The last layer has one output channel per image
    channel, so fp32 there costs next to nothing; on the demo model the bf16 map error (max |diff| / map
    max) drops from 1.2e-2 to 8.8e-3 (fp16: 1.8e-3 -> 1.3e-3). Without autocast nothing changes. The layer
    keeps its parameters and state-dict keys: only its class becomes the fp32 subclass (so copies and
    pickles stay correct). Returns whether the layer is now fp32.
    """
    decoder = getattr(model, "decoder", None)
    last = decoder[-1] if isinstance(decoder, torch.nn.Sequential) and len(decoder) else None
    if last is None:
        return False
    cls = _FP32_LAYERS.get(type(last))
    if cls is not None:
        last.__class__ = cls
    return type(last) in _FP32_LAYERS.values()


def vae_forward(model: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``ConvVAE.reconstruct``: (mu, logvar, recon); the part of inspection worth compiling."""
    return model.reconstruct(x)


def pad_batch(x: torch.Tensor, size: int) -> torch.Tensor:
    """``x`` (N, ...) zero-padded along the batch to ``size`` rows (``x`` itself when N >= size), keeping
    channels_last when ``x`` has it: CUDA graphs replay only for the shapes (and strides) they captured."""
    n = x.shape[0]
    if n >= size:
        return x
    cl = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)
    xp = torch.zeros((size, *x.shape[1:]), dtype=x.dtype, device=x.device)
    xp = xp.contiguous(memory_format=torch.channels_last) if cl else xp
    xp[:n] = x
    return xp


class CompiledVAE:
    """``torch.compile``'d ``vae_forward`` (``dynamic=False``).

    With CUDA graphs (``mode='reduce-overhead'``) shapes must repeat: each batch is zero-padded up to the
    largest batch seen (eval-mode BatchNorm keeps samples independent, so padding changes nothing) and the
    outputs are sliced back. An OOM resets that size so a halved retry is not padded up again.
    """

    def __init__(self, model: torch.nn.Module, mode: str | None = None):
        self.mode = mode
        self.pad = bool(mode) and "reduce-overhead" in str(mode)
        self.fixed = 0
        self._fn = torch.compile(lambda x: vae_forward(model, x), mode=mode, dynamic=False)

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        n = x.shape[0]
        if self.pad:
            self.fixed = max(self.fixed, n)
            x = pad_batch(x, self.fixed)
            torch.compiler.cudagraph_mark_step_begin()
        try:
            mu, logvar, recon = self._fn(x)
        except Exception as e:
            if is_oom(e):
                self.fixed = 0
            raise
        return mu[:n], logvar[:n], recon[:n]
