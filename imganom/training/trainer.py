"""Training loop for ``ConvVAE`` on normal images: AdamW + cosine, autocast, early stopping, exact resume.

A run directory holds ``checkpoint.safetensors`` (weights, best weights, optimizer and RNG state; JSON
metadata, nothing pickled), ``log.csv`` (one row per epoch) and, at the end, ``model.safetensors``.
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader

from imganom.config import Config
from imganom.data.discovery import find_images, is_mvtec_root, relative_id, train_val_split
from imganom.formats.modelfile import save_model
from imganom.models.losses import kl_weight, vae_loss
from imganom.models.vae import ConvVAE
from imganom.training.dataset import NormalImages, fingerprint
from imganom.utils.device import autocast_dtype, resolve_device

log = logging.getLogger(__name__)
CKPT = "checkpoint.safetensors"
LOG_COLUMNS = [
    "epoch",
    "train_loss",
    "train_recon",
    "train_kl",
    "val_loss",
    "val_recon",
    "val_kl",
    "beta",
    "lr",
    "images_per_s",
    "seconds",
]


def training_images(data: str | Path) -> tuple[list[Path], list[str]]:
    """Normal training images: ``train/good`` of an MVTec root, else every image under the folder."""
    root = Path(data)
    if not root.is_dir():
        raise FileNotFoundError(f"training data folder not found: {root}")
    if is_mvtec_root(root):
        root = root / "train" / "good"
    paths = find_images(root)
    if not paths:
        raise ValueError(f"no images found under {root}")
    return paths, [relative_id(p, root) for p in paths]


@dataclass
class TrainResult:
    run_dir: Path
    model_path: Path
    epochs_run: int
    best_val: float
    stopped_early: bool
    interrupted: bool
    seconds: float
    val_paths: list[Path]
    train_paths: list[Path] = field(default_factory=list)  # the images trained on (normal-map statistics)


def _cosine_lr(cfg: Config, step: int, total: int) -> float:
    warm = max(1, total // 50)
    if step < warm:
        return cfg.train.lr * (step + 1) / warm
    t = (step - warm) / max(1, total - warm)
    return cfg.train.lr * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


def _checkpoint_snapshot(model, best_state, opt, state: dict[str, Any]) -> tuple[dict, dict]:
    """CPU copies of everything a checkpoint holds, taken at an epoch boundary: (tensors, metadata)."""
    tensors = {f"model.{k}": v.detach().cpu().clone().contiguous() for k, v in model.state_dict().items()}
    tensors.update({f"best.{k}": v.detach().cpu().clone().contiguous() for k, v in best_state.items()})
    osd = opt.state_dict()
    for idx, st in osd["state"].items():
        for name, v in st.items():
            tensors[f"opt.{idx}.{name}"] = v.detach().cpu().clone().contiguous().reshape(v.shape)
    tensors["rng.torch"] = torch.get_rng_state()
    return tensors, json.loads(json.dumps({**state, "param_groups": osd["param_groups"]}))


def _write_checkpoint(path: Path, snapshot: tuple[dict, dict]) -> None:
    tensors, meta = snapshot
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata={"imganom_ckpt": json.dumps(meta)})
    os.replace(tmp, path)


def _truncate_log(log_path: Path, epochs: int) -> None:
    """Drop log rows of epochs after the checkpoint (a run killed after logging them will redo them)."""
    with open(log_path, newline="") as f:
        rows = list(csv.reader(f))
    keep = rows[:1] + [r for r in rows[1:] if r and r[0].isdigit() and int(r[0]) <= epochs]
    if len(keep) != len(rows):
        with open(log_path, "w", newline="") as f:
            csv.writer(f).writerows(keep)


def _load_checkpoint(path: Path, model, opt) -> tuple[dict, dict[str, torch.Tensor]]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["imganom_ckpt"])
    t = load_file(str(path))
    model.load_state_dict({k[6:]: v for k, v in t.items() if k.startswith("model.")})
    best = {k[5:]: v for k, v in t.items() if k.startswith("best.")}
    state: dict[int, dict[str, torch.Tensor]] = {}
    for k, v in t.items():
        if k.startswith("opt."):
            _, idx, name = k.split(".", 2)
            state.setdefault(int(idx), {})[name] = v
    opt.load_state_dict({"state": state, "param_groups": meta.pop("param_groups")})
    torch.set_rng_state(t["rng.torch"])
    return meta, best


def _run_epoch(
    model, loader, opt, cfg, device, amp, scaler, epoch, n_batches, total_steps, step, progress, task
):
    model.train()
    sums = {"loss": 0.0, "recon": 0.0, "kl": 0.0}
    n = 0
    t0 = time.perf_counter()
    for i, x in enumerate(loader):
        x = x.to(device, non_blocking=True).to(memory_format=torch.channels_last)
        lr = _cosine_lr(cfg, step, total_steps)
        for g in opt.param_groups:
            g["lr"] = lr
        beta = kl_weight(cfg.loss, epoch + i / n_batches)
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            out = model(x)
        terms = vae_loss(x, out, cfg.loss, beta)
        opt.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(terms["loss"]).backward()
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            scaler.step(opt)
            scaler.update()
        else:
            terms["loss"].backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            opt.step()
        step += 1
        n += len(x)
        for k in sums:
            sums[k] += float(terms[k].detach()) * len(x)
        if progress is not None:
            progress.update(task, advance=len(x), loss=sums["loss"] / n, ips=n / (time.perf_counter() - t0))
    return {k: v / max(n, 1) for k, v in sums.items()}, step, beta, lr, n


@torch.no_grad()
def evaluate_loss(model, loader, cfg: Config, device, amp) -> dict[str, float]:
    """Mean loss terms with the posterior mean decoded (deterministic), full KL weight."""
    model.eval()
    sums = {"loss": 0.0, "recon": 0.0, "kl": 0.0}
    n = 0
    for x in loader:
        x = x.to(device).to(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            out = model(x)
        terms = vae_loss(x, out, cfg.loss, cfg.loss.beta)
        n += len(x)
        for k in sums:
            sums[k] += float(terms[k].detach()) * len(x)
    return {k: v / max(n, 1) for k, v in sums.items()}


def train(
    cfg: Config,
    data: str | Path,
    run_dir: str | Path,
    *,
    resume: bool = False,
    device: str = "auto",
    progress: bool = True,
) -> TrainResult:
    """Train on the normal images under ``data``; writes the run directory and returns a summary."""
    t0 = time.perf_counter()
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    dev = resolve_device(device)
    amp = autocast_dtype(cfg.train.precision, dev, training=True)
    torch.manual_seed(cfg.train.seed)

    paths, ids = training_images(data)
    if cfg.train.max_images:
        paths, ids = paths[: cfg.train.max_images], ids[: cfg.train.max_images]
    idx = list(range(len(paths)))
    tr_idx, va_idx = train_val_split(idx, cfg.train.val_fraction, cfg.train.seed)
    train_set = NormalImages([paths[i] for i in tr_idx], [ids[i] for i in tr_idx], cfg, train=True)
    val_set = (
        NormalImages([paths[i] for i in va_idx], [ids[i] for i in va_idx], cfg, train=False)
        if va_idx
        else None
    )

    model = ConvVAE(cfg.model, cfg.preprocess.channels, cfg.preprocess.size).to(dev)
    model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    scaler = torch.amp.GradScaler(dev.type) if amp == torch.float16 else None
    fwd = torch.compile(model) if cfg.train.compile else model

    state = {
        "epoch": 0,
        "step": 0,
        "best_val": float("inf"),
        "best_epoch": -1,
        "bad_epochs": 0,
        "config": cfg.model_dump(mode="json"),
    }
    best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    ckpt = run_dir / CKPT
    if resume:
        if not ckpt.is_file():
            raise FileNotFoundError(f"--resume: no checkpoint at {ckpt}")
        loaded, best_state = _load_checkpoint(ckpt, model, opt)
        if loaded["config"] != state["config"]:
            raise ValueError(f"--resume: config differs from the checkpoint's in {ckpt}; use the same config")
        state.update(loaded)
    log_path = run_dir / "log.csv"
    if not resume or not log_path.exists():
        with open(log_path, "w", newline="") as f:
            csv.writer(f).writerow(LOG_COLUMNS)
    else:
        _truncate_log(log_path, state["epoch"])
    # the last epoch-boundary state: what Ctrl-C saves, so resuming is exact even after a mid-epoch interrupt
    snapshot = _checkpoint_snapshot(model, best_state, opt, state)

    g = torch.Generator().manual_seed(cfg.train.seed)
    bs = min(cfg.train.batch_size, len(train_set))
    n_batches = math.ceil(len(train_set) / bs)
    total_steps = n_batches * cfg.train.epochs
    val_loader = (
        DataLoader(val_set, batch_size=bs, shuffle=False, num_workers=cfg.train.workers) if val_set else None
    )
    stopped_early = interrupted = False
    bar_ctx = _progress_bar() if progress else contextlib.nullcontext()
    with bar_ctx as bar:
        task = (
            bar.add_task("train", total=len(train_set), loss=float("nan"), ips=0.0)
            if bar is not None
            else None
        )
        try:
            while state["epoch"] < cfg.train.epochs:
                epoch = state["epoch"]
                te = time.perf_counter()
                train_set.epoch = epoch
                g.manual_seed(cfg.train.seed * 100_003 + epoch)
                loader = DataLoader(
                    train_set,
                    batch_size=bs,
                    shuffle=True,
                    generator=g,
                    drop_last=False,
                    num_workers=cfg.train.workers,
                    persistent_workers=False,
                )
                if bar is not None:
                    bar.reset(task, total=len(train_set), description=f"epoch {epoch + 1}/{cfg.train.epochs}")
                tr, state["step"], beta, lr, n = _run_epoch(
                    fwd,
                    loader,
                    opt,
                    cfg,
                    dev,
                    amp,
                    scaler,
                    epoch,
                    n_batches,
                    total_steps,
                    state["step"],
                    bar,
                    task,
                )
                secs = time.perf_counter() - te
                va = evaluate_loss(fwd, val_loader, cfg, dev, amp) if val_loader else tr
                state["epoch"] = epoch + 1
                if va["loss"] < state["best_val"] - 1e-6:
                    state.update(best_val=va["loss"], best_epoch=epoch, bad_epochs=0)
                    best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
                else:
                    state["bad_epochs"] += 1
                with open(log_path, "a", newline="") as f:
                    csv.writer(f).writerow(
                        [
                            epoch + 1,
                            tr["loss"],
                            tr["recon"],
                            tr["kl"],
                            va["loss"],
                            va["recon"],
                            va["kl"],
                            beta,
                            lr,
                            n / secs,
                            secs,
                        ]
                    )
                log.info(
                    "epoch %d train %.4f val %.4f (%.0f img/s)", epoch + 1, tr["loss"], va["loss"], n / secs
                )
                done = state["epoch"] >= cfg.train.epochs
                if cfg.train.patience and state["bad_epochs"] >= cfg.train.patience:
                    stopped_early = done = True
                snapshot = _checkpoint_snapshot(model, best_state, opt, state)
                if done or state["epoch"] % cfg.train.checkpoint_every == 0:
                    _write_checkpoint(ckpt, snapshot)
                if done:
                    break
        except KeyboardInterrupt:
            interrupted = True
            _write_checkpoint(ckpt, snapshot)  # the last completed epoch, not the partial one
            state.update({k: v for k, v in snapshot[1].items() if k != "param_groups"})
            best_state = {k[5:]: v for k, v in snapshot[0].items() if k.startswith("best.")}
            log.warning("interrupted: resumable checkpoint saved to %s (epoch %d)", ckpt, state["epoch"])

    model.load_state_dict(best_state)
    model = model.to(memory_format=torch.contiguous_format).cpu().eval()
    training = {
        "data": str(data),
        "fingerprint": fingerprint(train_set.ids),
        "val_fingerprint": fingerprint(val_set.ids) if val_set else None,
        "epochs": state["epoch"],
        "best_epoch": state["best_epoch"] + 1,
        "best_val_loss": state["best_val"],
        "skipped": train_set.skipped,
        "seed": cfg.train.seed,
        "device": str(dev),
        "precision": str(amp).replace("torch.", "") if amp else "fp32",
    }
    model_path = run_dir / "model.safetensors"
    save_model(model_path, model, cfg, training=training)
    return TrainResult(
        run_dir,
        model_path,
        state["epoch"],
        state["best_val"],
        stopped_early,
        interrupted,
        time.perf_counter() - t0,
        [paths[i] for i in va_idx],
        [paths[i] for i in tr_idx],
    )


def _progress_bar():
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.4f}"),
        TextColumn("{task.fields[ips]:.0f} img/s"),
        TimeElapsedColumn(),
        transient=False,
    )
