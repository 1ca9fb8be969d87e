"""Naive MONAI baseline: the VAE anomaly detector a user would write in an afternoon, scored like imganom.

* Model: ``monai.networks.nets.VarAutoEncoder`` (2-D, channels 16-32-64-128, strides 2, latent 128), trained
  on ``train/good`` resized to ``--size`` with the standard loss (sum-MSE + beta * KL per image), Adam,
  a fixed number of epochs, no augmentation, no early stopping.
* Map: squared reconstruction error of the posterior mean, averaged over channels, resized back to the
  original image size bilinearly. Image score: the map's maximum. No smoothing, no calibration tricks.
* Thresholds from the held-out normal split (``--val-fraction`` of train/good): pixel = 99.9 % quantile of
  its pooled pixels, image = 99 % quantile of its image scores.
* Evaluation: ``evaluation.evaluate`` -- the same streaming metrics (``EvalAccumulator``), mask
  handling and report as ``imganom evaluate``, on the same test split at original mask resolution.

Example: ``python tools/baseline_monai.py --data /data/mvtec/bottle --epochs 30 --out runs/baseline-bottle``
Writes ``OUT/metrics.json`` (same shape as ``imganom evaluate``, plus ``train_seconds`` and a ``baseline``
section), ``OUT/report.html`` and ``OUT/baseline.pt`` (the weights).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from imganom.data.discovery import scan_mvtec, train_val_split
from imganom.data.readers import ImageMeta, read_image
from imganom.evaluation.evaluate import evaluate
from imganom.inference.inspector import Result

CHANNELS = (16, 32, 64, 128)
STRIDES = (2, 2, 2, 2)
PIXEL_QUANTILE, IMAGE_QUANTILE = 0.999, 0.99
MAX_PIXELS_PER_IMAGE = 200_000  # pooled-quantile sample per validation image


def _load(paths: list[Path], size: int, channels: int) -> torch.Tensor:
    """Images as (N, C, size, size) float32 in [0, 1] (area-resampled)."""
    out = []
    for p in paths:
        chw, _ = read_image(p, channels=channels)
        out.append(np.stack([cv2.resize(c, (size, size), interpolation=cv2.INTER_AREA) for c in chw]))
    return torch.from_numpy(np.stack(out))


def _loss(recon: torch.Tensor, x: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor, beta: float):
    mse = F.mse_loss(recon, x, reduction="sum") / len(x)
    kl = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp()) / len(x)
    return mse + beta * kl, mse, kl


def train(args: argparse.Namespace, x: torch.Tensor, device: torch.device) -> tuple[torch.nn.Module, list]:
    """Fixed-epoch Adam training of a MONAI VarAutoEncoder; returns the model and per-epoch losses."""
    from monai.networks.nets import VarAutoEncoder

    c = x.shape[1]
    model = VarAutoEncoder(
        spatial_dims=2, in_shape=(c, args.size, args.size), out_channels=c, latent_size=args.latent,
        channels=CHANNELS, strides=STRIDES,
    ).to(device)  # fmt: skip
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    g = torch.Generator().manual_seed(args.seed)
    history = []
    for epoch in range(args.epochs):
        model.train()
        sums = np.zeros(3)  # loss, mse, kl summed over images
        for idx in torch.randperm(len(x), generator=g).split(args.batch_size):
            xb = x[idx].to(device)
            recon, mu, logvar, _ = model(xb)
            loss, mse, kl = _loss(recon, xb, mu, logvar, args.beta)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sums += np.array([loss.item(), mse.item(), kl.item()]) * len(xb)
        lo, ms, kl_ = sums / len(x)
        history.append(round(float(lo), 4))
        print(f"epoch {epoch + 1}/{args.epochs}  loss {lo:.3f}  (mse {ms:.3f}, kl {kl_:.3f})", flush=True)
    return model.eval(), history


class BaselinePredictor:
    """``predict_arrays`` for ``evaluation.evaluate``: squared-error maps at original size, score = max."""

    def __init__(self, model: torch.nn.Module, size: int, device: torch.device):
        self.model, self.size, self.device = model, size, device
        self.image_threshold: float | None = None
        self.pixel_threshold: float | None = None

    @torch.no_grad()
    def maps(self, chws: list[np.ndarray]) -> list[np.ndarray]:
        """Original-size float32 maps for a list of CHW images."""
        s = self.size
        views = np.stack(
            [np.stack([cv2.resize(c, (s, s), interpolation=cv2.INTER_AREA) for c in a]) for a in chws]
        )
        x = torch.from_numpy(views).to(self.device)
        mu, _ = self.model.encode_forward(x)
        recon = self.model.decode_forward(mu)
        small = ((recon - x) ** 2).mean(1).float().cpu().numpy()
        return [
            cv2.resize(m, (a.shape[2], a.shape[1]), interpolation=cv2.INTER_LINEAR)
            for m, a in zip(small, chws)
        ]

    def predict_arrays(
        self, items: list[tuple[str, np.ndarray, ImageMeta | None]], keep_image: bool = False, decode_ms=None
    ) -> list[Result]:
        thr = {"image": self.image_threshold, "pixel": self.pixel_threshold}
        out = []
        for (item_id, chw, meta), amap in zip(items, self.maps([c for _, c, _ in items])):
            score = float(amap.max())
            pthr = self.pixel_threshold if self.pixel_threshold is not None else math.inf
            mask = (amap > pthr).astype(np.uint8)
            bad = self.image_threshold is not None and score > self.image_threshold
            keep = chw if keep_image else None
            out.append(Result(item_id, score, float("nan"), bad, amap, mask, [], thr, {}, meta, keep))
        return out

    def calibrate(self, paths: list[Path], channels: int, batch_size: int, seed: int) -> dict[str, Any]:
        """Pixel threshold: 99.9 % quantile of pooled normal pixels; image threshold: 99 % of image scores."""
        rng = np.random.default_rng(seed)
        scores, pix = [], []
        for i in range(0, len(paths), batch_size):
            chws = [read_image(p, channels=channels)[0] for p in paths[i : i + batch_size]]
            for m in self.maps(chws):
                scores.append(float(m.max()))
                flat = m.ravel()
                pix.append(rng.choice(flat, MAX_PIXELS_PER_IMAGE, replace=False) if flat.size > 2e5 else flat)
        self.pixel_threshold = float(np.quantile(np.concatenate(pix), PIXEL_QUANTILE))
        self.image_threshold = float(np.quantile(scores, IMAGE_QUANTILE))
        return {"n_images": len(scores), "pixel_quantile": PIXEL_QUANTILE, "image_quantile": IMAGE_QUANTILE}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, type=Path, help="MVTec-style root")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--size", type=int, default=128, help="square model input side (multiple of 16)")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--beta", type=float, default=1.0, help="KL weight")
    p.add_argument("--latent", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--max-train", type=int, default=None, help="use at most N training images (random subset)"
    )
    p.add_argument("--val-fraction", type=float, default=0.1, help="held-out normal images for thresholds")
    p.add_argument("--workers", type=int, default=2, help="test-set decoding workers")
    p.add_argument("--worst", type=int, default=8)
    p.add_argument("--device", default="auto")
    a = p.parse_args(argv)
    if a.size % 16:
        p.error("--size must be a multiple of 16 (four stride-2 stages)")
    torch.manual_seed(a.seed)
    device = torch.device("cuda" if a.device == "auto" and torch.cuda.is_available() else
                          "cpu" if a.device == "auto" else a.device)  # fmt: skip

    layout = scan_mvtec(a.data)
    paths = layout.train
    if a.max_train and len(paths) > a.max_train:
        keep = sorted(np.random.default_rng(a.seed).permutation(len(paths))[: a.max_train].tolist())
        paths = [paths[i] for i in keep]
    train_paths, val_paths = train_val_split(paths, a.val_fraction, a.seed)
    if not val_paths:
        print("warning: no held-out normal images; thresholds come from the training images")
        val_paths = train_paths
    channels = read_image(train_paths[0])[0].shape[0]
    channels = 3 if channels >= 3 else 1

    t0 = time.perf_counter()
    x = _load(train_paths, a.size, channels)
    model, history = train(a, x, device)
    train_seconds = time.perf_counter() - t0
    a.out.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), a.out / "baseline.pt")

    pred = BaselinePredictor(model, a.size, device)
    cal = pred.calibrate(val_paths, channels, a.batch_size, a.seed)
    info = {
        "id": None,
        "name": "monai-VarAutoEncoder-baseline",
        "size": [a.size, a.size],
        "device": str(device),
        "precision": "fp32",
        "calibrated": True,
    }
    baseline = {
        "channels": list(CHANNELS),
        "strides": list(STRIDES),
        "latent_size": a.latent,
        "in_channels": channels,
        "size": a.size,
        "epochs": a.epochs,
        "batch_size": a.batch_size,
        "lr": a.lr,
        "beta": a.beta,
        "seed": a.seed,
        "n_train": len(train_paths),
        "n_val": len(val_paths),
        "loss_history": history,
        "calibration": cal,
    }
    extra = {"train_seconds": train_seconds, "baseline": baseline}
    m = evaluate(
        pred,
        layout,
        a.out,
        a.batch_size,
        a.worst,
        workers=a.workers,
        threshold_source="val-quantile",
        read_kwargs={"channels": channels},
        model_info=info,
        extra=extra,
        title="MONAI VarAutoEncoder baseline",
    )
    short = {
        "image_auroc": m["image"]["auroc"],
        "pixel_auroc": m["pixel"]["auroc"],
        "aupro_0.3": m["pixel"]["aupro_0.3"],
        "train_seconds": round(train_seconds, 2),
        "throughput_img_s": m["throughput_img_s"],
    }
    print(json.dumps(short))
    return m


if __name__ == "__main__":
    main()
