"""Post-hoc ablation of anomaly-map and score choices on one trained model (fast, model resolution).

Runs the VAE once over the held-out normal split and the test split of an MVTec root, keeps the raw L1 and
(1-SSIM)/2 components at model resolution, then scores a grid of variants without re-running the model:
map mix, normalisation (none / per-pixel z-score from the normal split / per-image robust z-score), smoothing
sigma, border margin, image score (max / top-k mean). Ground-truth masks are area-resampled to model
resolution (> 0.5), so the pixel numbers rank variants; confirm the winner with ``imganom evaluate``.

Example: ``python tools/ablate_maps.py --model runs/mt/model.safetensors --data DATA/magnetic_tile``
Prints one table (best AUPRO first) and writes ``--out`` JSON.
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import cv2
import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from imganom.data.discovery import find_images, scan_mvtec, train_val_split
from imganom.data.preprocess import prepare
from imganom.data.readers import read_image
from imganom.inference.inspector import Inspector
from imganom.ops.maps import gaussian_blur, ssim_map
from imganom.ops.metrics import PixelMetrics


@torch.no_grad()
def components(
    insp: Inspector, paths: list[Path], batch: int = 32, proj: tuple[int, float, float] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Raw L1 and (1-SSIM)/2 maps (N, h, w) at model resolution, channel-mean; ``proj`` = (steps, alpha,
    lam) first projects each input onto the normal manifold (``tools/projection.py``)."""
    pp, win = insp.cfg.preprocess, insp.cfg.map.ssim_window
    l1s, sss = [], []
    for i in range(0, len(paths), batch):
        views = []
        for p in paths[i : i + batch]:
            chw, _ = read_image(p, intensity=pp.intensity, channels=pp.channels, max_pixels=pp.max_pixels)
            views.append(prepare(chw, pp)[0][0])
        x = torch.from_numpy(np.stack(views))
        if proj:
            from projection import project  # tools/projection.py, next to this script

            _, r = project(insp.model, x, proj[0], proj[1], proj[2], ssim_window=win)
        else:
            mu, _ = insp.model.encode(x)
            r = insp.model.decode(mu).float()
        l1s.append((x - r).abs().mean(1).numpy())
        sss.append((0.5 * (1 - ssim_map(x, r, win))).mean(1).numpy())
    return np.concatenate(l1s), np.concatenate(sss)


def gt_masks(items, size: tuple[int, int]) -> list[np.ndarray | None]:
    out = []
    for it in items:
        if it.mask_path is None:
            out.append(None)
            continue
        m = cv2.imread(str(it.mask_path), cv2.IMREAD_GRAYSCALE).astype(np.float32) / 255.0
        out.append(cv2.resize(m, size[::-1], interpolation=cv2.INTER_AREA) > 0.5)
    return out


def _blur(m: np.ndarray, sigma: float) -> np.ndarray:
    return gaussian_blur(torch.from_numpy(np.ascontiguousarray(m, dtype=np.float32)), sigma).numpy()


def _normalise(t: np.ndarray, v: np.ndarray, norm: str) -> np.ndarray:
    """Normalise smoothed test maps ``t`` by smoothed normal maps ``v``: per pixel, globally, per image."""
    if norm == "pixel":
        std = v.std(0)
        return (t - v.mean(0)) / (std + 0.1 * std.mean() + 1e-6)
    if norm == "global":
        return (t - v.mean()) / (v.std() + 1e-6)
    if norm == "image":
        med = np.median(t, axis=(1, 2), keepdims=True)
        mad = np.median(np.abs(t - med), axis=(1, 2), keepdims=True)
        return (t - med) / (1.4826 * mad + 1e-6)
    return t


def variant_maps(val: np.ndarray, test: np.ndarray, norm: str, sigma: str) -> np.ndarray:
    """``sigma`` '2' = one scale; '1+8' = max over scales of the normalised maps (global z if norm=none)."""
    scales = [float(x) for x in sigma.split("+")]
    if len(scales) == 1:
        return _normalise(_blur(test, scales[0]), _blur(val, scales[0]), norm)
    n = "global" if norm == "none" else norm
    return np.max([_normalise(_blur(test, s), _blur(val, s), n) for s in scales], axis=0)


def score_images(maps: np.ndarray, kind: str, border: int) -> np.ndarray:
    if border:
        maps = maps[:, border:-border, border:-border]
    flat = maps.reshape(len(maps), -1)
    if kind == "max":
        return flat.max(1)
    k = max(1, int(0.01 * flat.shape[1]))
    return np.sort(flat, axis=1)[:, -k:].mean(1)


def pixel_metrics(maps: np.ndarray, masks: list[np.ndarray | None], border: int) -> dict:
    if border:
        maps = maps.copy()
        maps[:, :border], maps[:, -border:], maps[:, :, :border], maps[:, :, -border:] = [maps.min()] * 4
    lo, hi = float(maps.min()), float(maps.max()) + 1e-6
    pm = PixelMetrics(lo, hi, bins=20_000)
    for a, m in zip(maps, masks):
        pm.add(a, m)
    return pm.compute(0.3)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--out", default=None)
    ap.add_argument("--sigmas", default="1,2,4")
    ap.add_argument("--project", default=None, help="steps,alpha,lam: project inputs first")
    ap.add_argument("--mixes", default="1:0,0:1,0.5:0.5")
    ap.add_argument("--norms", default="none,pixel,image")
    ap.add_argument("--cache", default=None, help="npz of the raw components (written, or read if present)")
    ap.add_argument("--per-type", type=int, default=3, help="per-type metrics for the best N rows")
    args = ap.parse_args()
    torch.manual_seed(0)
    insp = Inspector.load(args.model, device="cpu", precision="fp32")
    cfg = insp.cfg
    layout = scan_mvtec(args.data)
    train = find_images(Path(args.data) / "train" / "good")
    _, val = train_val_split(train, cfg.train.val_fraction, cfg.train.seed)
    items = layout.test
    proj = None
    if args.project:
        st, al, la = args.project.split(",")
        proj = (int(st), float(al), float(la))
    if args.cache and Path(args.cache).is_file():
        z = np.load(args.cache)
        vl1, vss, tl1, tss = z["vl1"], z["vss"], z["tl1"], z["tss"]
    else:
        vl1, vss = components(insp, val, proj=proj)
        tl1, tss = components(insp, [it.path for it in items], proj=proj)
        if args.cache:
            np.savez(args.cache, vl1=vl1, vss=vss, tl1=tl1, tss=tss)
    types = np.array([it.defect_type for it in items])
    labels = np.array([0 if it.defect_type == "good" else 1 for it in items])
    masks = gt_masks(items, cfg.preprocess.size)
    mixes = [tuple(float(v) for v in m.split(":")) for m in args.mixes.split(",")]
    rows = []
    sigmas = args.sigmas.split(",")
    for (wl1, wss), norm, sigma in itertools.product(mixes, args.norms.split(","), sigmas):
        maps = variant_maps(wl1 * vl1 + wss * vss, wl1 * tl1 + wss * tss, norm, sigma)
        for border in (0, 4):
            pix = pixel_metrics(maps, masks, border)
            for kind in ("max", "topk"):
                s = score_images(maps, kind, border)
                rows.append(
                    {
                        "l1": wl1, "ssim": wss, "norm": norm, "sigma": sigma, "border": border, "score": kind,
                        "image_auroc": float(roc_auc_score(labels, s)),
                        "pixel_auroc": pix["auroc"], "aupro": pix["aupro_0.3"],
                    }
                )
    rows.sort(key=lambda r: -(r["image_auroc"] + r["pixel_auroc"] + r["aupro"]))
    head = ("l1", 4), ("ssim", 4), ("norm", 6), ("sig", 4), ("bd", 3), ("score", 5), ("imgAUC", 7)
    print(" ".join(f"{h:>{w}}" for h, w in head), f"{'pixAUC':>7} {'AUPRO':>6}")
    for r in rows:
        print(
            f"{r['l1']:4.1f} {r['ssim']:4.1f} {r['norm']:>6} {r['sigma']:>4} {r['border']:3d} "
            f"{r['score']:>5} "
            f"{r['image_auroc']:7.3f} {r['pixel_auroc']:7.3f} {r['aupro']:6.3f}"
        )
    for r in rows[: args.per_type]:
        wl1, wss = r["l1"], r["ssim"]
        maps = variant_maps(wl1 * vl1 + wss * vss, wl1 * tl1 + wss * tss, r["norm"], r["sigma"])
        sc = score_images(maps, r["score"], r["border"])
        line = []
        for t in sorted(set(types) - {"good"}):
            sel = (types == t) | (types == "good")
            pix = pixel_metrics(maps[sel], [m for m, k in zip(masks, sel) if k], r["border"])
            auc = roc_auc_score(labels[sel], sc[sel])
            line.append(f"{t}: img {auc:.3f} pix {pix['auroc']:.3f} pro {pix['aupro_0.3']:.3f}")
        tag = f"{wl1}:{wss} {r['norm']} s{r['sigma']} b{r['border']} {r['score']}"
        print(f"  {tag} | " + "; ".join(line))
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
