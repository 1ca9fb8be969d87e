"""Do synthetic defects rank map/score settings the way real labels do? (issue 11, ``map: auto``)

For one trained model and a labelled MVTec-style dataset, scores every ``map: auto`` candidate (mix, channel
reduction, standardisation, scales, sigma, score mode; ``training.selfcheck.rank_settings``) twice: on the
pseudo anomalies the trainer uses (pasted into the run's held-out normals) and on the real test split
(masks area-resampled to model resolution, > 0.5, as ``tools/ablate_maps.py``: proxy numbers that rank
settings). Prints the Spearman rank correlation per metric over the candidates, and the real metrics of the
setting ``map: auto`` picks starting from the model's setting (``MARGIN`` rule), of the best setting on
synthetic defects, of the model's own setting and of the real-label best.

    python tools/pseudo_rank.py --model runs/mt/model.safetensors --data DATA/magnetic_tile --json out.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import cv2
import numpy as np
import torch
from scipy.stats import spearmanr

from imganom.data.discovery import scan_mvtec
from imganom.data.preprocess import prepare
from imganom.data.readers import read_image, read_options
from imganom.formats.modelfile import load_model
from imganom.training import selfcheck
from imganom.training.dataset import NormalImages
from imganom.training.paths import split_images
from imganom.training.trainer import SEED_SELECT

KEYS = (*selfcheck.METRICS, "mean")


def real_set(data: Path, cfg) -> selfcheck.PseudoSet:
    """The labelled test split as a ``PseudoSet``: good images first, masks at model resolution."""
    items = sorted(scan_mvtec(data).test, key=lambda it: it.label)
    h, w = cfg.preprocess.size
    views, masks = [], []
    for it in items:
        chw, _ = read_image(it.path, **read_options(cfg.preprocess))
        views.append(prepare(chw, cfg.preprocess)[0][0])
        m = np.zeros((h, w), bool)
        if it.mask_path is not None:
            g = cv2.imread(str(it.mask_path), cv2.IMREAD_GRAYSCALE).astype(np.float32) / 255.0
            m = cv2.resize(g, (w, h), interpolation=cv2.INTER_AREA) > 0.5
        masks.append(m)
    fams = ["" if it.label == 0 else it.defect_type for it in items]
    n_good = sum(it.label == 0 for it in items)
    return selfcheck.PseudoSet(torch.from_numpy(np.stack(views)), np.stack(masks), fams, n_good)


def _key(setting: dict) -> str:
    return json.dumps(setting, sort_keys=True)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="model file or run directory")
    ap.add_argument("--data", required=True, type=Path, help="the MVTec-style root the model was trained on")
    ap.add_argument("--json", default=None, help="write every candidate's pseudo and real metrics here")
    a = ap.parse_args(argv)
    torch.manual_seed(0)
    model, meta, _ = load_model(a.model)
    cfg = meta.cfg
    dev = torch.device("cpu")
    (tr_paths, tr_ids), (va_paths, va_ids) = split_images(cfg, a.data)
    normals = NormalImages(tr_paths, tr_ids, cfg, train=False).views()[selfcheck.stats_subset(len(tr_paths))]
    held = NormalImages(va_paths or tr_paths, va_ids or tr_ids, cfg, train=False).views()
    pseudo = selfcheck.PseudoSet.build(list(held.numpy()), cfg.train.seed * 10 + SEED_SELECT)
    own = selfcheck.setting_of(cfg.map, cfg.postprocess.sigma, cfg.postprocess.score)
    extra = [(cfg.map.model_copy(update={"auto": False}), cfg.postprocess.sigma)]
    rows_p = selfcheck.rank_settings(model, pseudo, normals, cfg, dev, extra=extra)
    real = selfcheck.rank_settings(model, real_set(a.data, cfg), normals, cfg, dev, extra=extra)
    rows_r = {_key(r["setting"]): r for r in real}
    pairs = [(p, rows_r[_key(p["setting"])]) for p in rows_p]
    rho = {k: float(spearmanr([p[k] for p, _ in pairs], [r[k] for _, r in pairs])[0]) for k in KEYS}
    own_p = next(p for p in rows_p if _key(p["setting"]) == _key(own))
    auto = own_p if rows_p[0]["mean"] < own_p["mean"] + selfcheck.MARGIN else rows_p[0]  # as choose_map
    best_real = max(rows_r.values(), key=lambda r: r["mean"])
    picks = {
        "best on synthetic defects": (rows_p[0], rows_r[_key(rows_p[0]["setting"])]),
        "map: auto from the model's setting": (auto, rows_r[_key(auto["setting"])]),
        "model's own setting": (own_p, rows_r[_key(own)]),
        "best on real labels": (next(p for p, _ in pairs if _key(p["setting"]) == _key(best_real["setting"])),
                                best_real),
    }  # fmt: skip
    print(f"{len(pairs)} settings; Spearman rank correlation pseudo vs real (model resolution):")
    print("| metric | " + " | ".join(KEYS) + " |\n|---|" + "---:|" * len(KEYS))
    print("| rho | " + " | ".join(f"{rho[k]:.3f}" for k in KEYS) + " |")
    print("\n| setting | which | pseudo img / pix / AUPRO | real img / pix / AUPRO |\n|---|---|---|---|")
    for name, (p, r) in picks.items():
        s = r["setting"]
        desc = (f"l1 {s['l1']} ssim {s['ssim']} {s['channel_reduce']}, std {s['standardize']}, "
                f"scales {s['scales']}, sigma {s['sigma']}, {s['score']}")  # fmt: skip
        fmt = " / ".join
        pv = fmt(f"{p[k]:.3f}" for k in selfcheck.METRICS)
        print(f"| {desc} | {name} | {pv} | {fmt(f'{r[k]:.3f}' for k in selfcheck.METRICS)} |")
    out = {"spearman": rho, "picks": {k: {"pseudo": p, "real": r} for k, (p, r) in picks.items()},
           "candidates": [{"setting": p["setting"], "pseudo": {k: p[k] for k in KEYS},
                           "real": {k: r[k] for k in KEYS}} for p, r in pairs]}  # fmt: skip
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
