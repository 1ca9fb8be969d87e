"""Training loop for ``ConvVAE`` on normal images: AdamW + cosine, autocast, early stopping, exact resume.

A run directory holds ``checkpoint.safetensors`` (weights, kept weights, optimizer and RNG state; JSON
metadata, nothing pickled), ``log.csv`` (one row per epoch) and, at the end, ``model.safetensors``.

Model selection (which epoch's weights are kept, what early stopping watches) uses ``train.select``: the
validation reconstruction loss (no KL term) or the self-supervised pseudo-anomaly score (``selfcheck``),
never the ELBO (``recon + beta * KL`` moves with the KL warm-up: an untrained epoch-1 model, KL ~ 0, would
win) and never an epoch inside the warm-up. ``log.csv`` records the criterion and the epoch kept so far on
every row; the model file records the epoch kept and why (``training.selection``), the ``map: auto`` choice
and the self-check on synthetic defects.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader

from imganom.config import Config
from imganom.formats.modelfile import load_model, save_model
from imganom.models.losses import kl_weight, vae_loss
from imganom.models.vae import ConvVAE
from imganom.training import selfcheck
from imganom.training.dataset import NormalImages, fingerprint
from imganom.training.distributed import context as dist_context
from imganom.training.paths import split_images, training_images  # noqa: F401 (re-exported)
from imganom.utils.device import autocast_dtype, resolve_device
from imganom.utils.files import atomic_path

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
    "criterion",  # train.select: val_recon or pseudo (1 - mean of the pseudo metrics), lower is better
    "select_value",  # empty when not measured (inside the KL warm-up; pseudo: between checks)
    "pseudo_image_auroc",
    "pseudo_pixel_auroc",
    "pseudo_aupro",
    "kept_epoch",  # the epoch whose weights are kept so far (0: none yet, still in the warm-up)
]
SEED_SELECT, SEED_CHECK = 1, 2  # pseudo sets: one for checkpoint and map choice, another for the self-check


@dataclass
class EpochProgress:
    """What the ``progress`` callback of ``train`` receives after every batch."""

    epoch: int  # 1-based
    epochs: int
    done: int  # images of this epoch so far
    total: int
    loss: float  # running mean of this epoch
    images_per_s: float


ProgressFn = Callable[[EpochProgress], None]


@dataclass
class TrainResult:
    run_dir: Path
    model_path: Path
    epochs_run: int
    best_val: float  # the selection criterion's value at the kept epoch
    stopped_early: bool
    interrupted: bool
    seconds: float
    val_paths: list[Path]
    train_paths: list[Path] = field(default_factory=list)  # the images trained on (normal-map statistics)
    best_epoch: int = 0  # 1-based epoch whose weights were kept
    selection: dict[str, Any] = field(default_factory=dict)  # criterion, epoch, value, reason
    self_check: dict[str, Any] | None = None  # pseudo-anomaly metrics of the final model
    map_choice: dict[str, Any] | None = None  # map: auto (chosen setting and its metrics)

    @property
    def summary(self) -> str:
        """One line: epochs, time and which epoch was kept why."""
        return (
            f"trained {self.epochs_run} epochs in {self.seconds:.1f}s"
            + (" (early stop)" if self.stopped_early else "")
            + f"; kept epoch {self.best_epoch}: {self.selection.get('reason', '')}"
        )

    def check_lines(self) -> list[tuple[str, str]]:
        """(level, text) lines about the map choice and the self-check; level "info" or "warning"."""
        out = []
        if self.map_choice:
            c = self.map_choice["chosen"]
            out.append(("info", "map: auto chose " + ", ".join(f"{k} {v}" for k, v in c.items())))
        sc = self.self_check
        if sc:
            f = {k: "n/a" if sc.get(k) is None else f"{sc[k]:.3f}" for k in selfcheck.METRICS}
            b = sc.get("baseline") or {}
            base = " / ".join("n/a" if b.get(k) is None else f"{b[k]:.3f}" for k in selfcheck.METRICS)
            out.append(
                (
                    "info",
                    f"self-check on synthetic defects: image AUROC {f['image_auroc']}, "
                    f"pixel AUROC {f['pixel_auroc']}, AUPRO {f['aupro']} (the average normal image as "
                    f"reconstruction: {base})",
                )
            )
            if sc.get("poor"):
                out.append(
                    (
                        "warning",
                        f"self-check is poor ({', '.join(sc['poor'])}): the model may miss real defects; "
                        "train longer, check that the training images are all normal, or try another preset",
                    )
                )
        return out


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
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"imganom_ckpt": json.dumps(meta)})


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


def _run_epoch(model, loader, opt, cfg, device, amp, scaler, epoch, n_batches, total_steps, step, progress):
    model.train()
    sums = {"loss": 0.0, "recon": 0.0, "kl": 0.0}
    n = 0
    t0 = time.perf_counter()
    total = len(loader.dataset)
    for i, batch in enumerate(loader):
        x, target = batch if isinstance(batch, (list, tuple)) else (batch, batch)  # denoising: (input, clean)
        x = x.to(device, non_blocking=True).to(memory_format=torch.channels_last)
        target = target.to(device, non_blocking=True)
        lr = _cosine_lr(cfg, step, total_steps)
        for g in opt.param_groups:
            g["lr"] = lr
        beta = kl_weight(cfg.loss, epoch + i / n_batches)
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            out = model(x)
        terms = vae_loss(target, out, cfg.loss, beta)
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
            ips = n / max(time.perf_counter() - t0, 1e-9)
            progress(EpochProgress(epoch + 1, cfg.train.epochs, n, total, sums["loss"] / n, ips))
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


def min_select_epoch(cfg: Config) -> int:
    """First epoch (1-based) whose weights may be kept: the one that ends the KL warm-up (the last epoch when
    the run is shorter than the warm-up)."""
    return max(1, min(cfg.loss.kl_warmup_epochs, cfg.train.epochs))


def _select_reason(cfg: Config, state: dict[str, Any]) -> str:
    first = min_select_epoch(cfg)
    if state["best_epoch"] < 0:
        return f"last epoch (the run ended before epoch {first}, the end of the KL warm-up)"
    if cfg.train.select == "pseudo":
        what = (
            f"best pseudo-anomaly score {1 - state['best_val']:.4f} "
            "(mean of image AUROC, pixel AUROC and AUPRO on synthetic defects), "
            f"checked every {cfg.train.pseudo_every} epochs"
        )
    else:
        what = f"lowest validation reconstruction loss {state['best_val']:.4f} (no KL term)"
    return f"{what} from epoch {first} on (after the KL warm-up)"


def _measure(
    cfg: Config, state: dict[str, Any], epoch: int, va: dict[str, float], pseudo_fn: Callable[[], dict] | None
) -> tuple[float | None, dict[str, Any] | None]:
    """The selection criterion for epoch ``epoch`` (1-based; lower is better), or None when not measured."""
    if epoch < min_select_epoch(cfg):
        return None, None
    if cfg.train.select == "recon" or pseudo_fn is None:
        return va["recon"], None
    if epoch % cfg.train.pseudo_every and epoch != cfg.train.epochs and epoch != min_select_epoch(cfg):
        return None, None
    m = pseudo_fn()
    return 1.0 - selfcheck.mean_metric(m), m


def train(
    cfg: Config,
    data: str | Path,
    run_dir: str | Path,
    *,
    resume: bool = False,
    device: str = "auto",
    progress: ProgressFn | bool | None = None,
    notes: dict[str, Any] | None = None,
    init: str | Path | None = None,
    extra_normals: Sequence[Path] = (),
) -> TrainResult:
    """Train on the normal images under ``data``; writes the run directory and returns a summary.

    Fine-tuning (``imganom train --resume-from``): ``init`` is a model file whose weights start the run (its
    architecture must match ``cfg``), ``extra_normals`` are more normal images added to the training split
    (e.g. false alarms a reviewer confirmed normal); the held-out split stays the one of ``data``.

    ``progress``: called with an ``EpochProgress`` after every batch (False/None: nothing). ``notes``: extra
    entries for the model file's training metadata (e.g. ``auto_config``: what ``--config auto`` chose)."""
    t0 = time.perf_counter()
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    dctx = dist_context(device)  # one process: no torch.distributed at all (training.distributed)
    dev = dctx.device(resolve_device(device))
    amp = autocast_dtype(cfg.train.precision, dev, training=True)
    torch.manual_seed(cfg.train.seed)
    on_progress = progress if callable(progress) and dctx.primary else None

    (tr_paths, tr_ids), (va_paths, va_ids) = split_images(cfg, data)
    tr_paths, tr_ids = tr_paths + list(extra_normals), tr_ids + [f"+{p}" for p in extra_normals]
    train_set = NormalImages(tr_paths, tr_ids, cfg, train=True)
    val_set = NormalImages(va_paths, va_ids, cfg, train=False) if va_paths else None
    pseudo_views = (
        val_set or train_set
    ).views()  # no held-out split: the training images (said in the check)
    pset_select = None

    model = ConvVAE(cfg.model, cfg.preprocess.channels, cfg.preprocess.size)
    if init is not None:
        model.load_state_dict(load_model(init)[0].state_dict())
    model = model.to(dev)
    model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    scaler = torch.amp.GradScaler(dev.type) if amp == torch.float16 else None
    net = dctx.wrap(model, dev)
    fwd = torch.compile(net) if cfg.train.compile else net

    def select_set() -> selfcheck.PseudoSet:  # built once, on first use
        nonlocal pset_select
        if pset_select is None:
            pset_select = selfcheck.PseudoSet.build(
                list(pseudo_views.numpy()), cfg.train.seed * 10 + SEED_SELECT
            )
        return pset_select

    def pseudo_fn() -> dict[str, Any]:
        return selfcheck.pseudo_score(model, select_set(), cfg, dev)

    state = {
        "epoch": 0,
        "step": 0,
        "best_val": float("inf"),
        "best_epoch": -1,
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
    if not dctx.primary:
        pass  # rank 0 alone writes the log, checkpoints and the model file
    elif not resume or not log_path.exists():
        with open(log_path, "w", newline="") as f:
            csv.writer(f).writerow(LOG_COLUMNS)
    else:
        _truncate_log(log_path, state["epoch"])
    # the last epoch-boundary state: what Ctrl-C saves, so resuming is exact even after a mid-epoch interrupt
    snapshot = _checkpoint_snapshot(model, best_state, opt, state)

    g = torch.Generator().manual_seed(cfg.train.seed)
    bs = dctx.local_batch(min(cfg.train.batch_size, len(train_set)))
    n_batches = math.ceil(dctx.local_count(len(train_set)) / bs)
    total_steps = n_batches * cfg.train.epochs
    val_loader = (
        DataLoader(val_set, batch_size=bs, shuffle=False, num_workers=cfg.train.workers) if val_set else None
    )
    criterion = "pseudo" if cfg.train.select == "pseudo" else "val_recon"
    stopped_early = interrupted = False
    try:
        while state["epoch"] < cfg.train.epochs:
            epoch = state["epoch"]
            te = time.perf_counter()
            train_set.epoch = epoch
            g.manual_seed(cfg.train.seed * 100_003 + epoch)
            loader = DataLoader(
                train_set,
                batch_size=bs,
                **dctx.shuffling(train_set, g, cfg.train.seed, epoch),
                drop_last=False,
                num_workers=cfg.train.workers,
                persistent_workers=False,
            )
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
                on_progress,
            )
            tr, n = dctx.mean(tr, n)
            secs = time.perf_counter() - te
            va = evaluate_loss(fwd, val_loader, cfg, dev, amp) if val_loader else tr
            state["epoch"] = epoch + 1
            value, pm = _measure(cfg, state, epoch + 1, va, pseudo_fn)
            if value is not None and value < state["best_val"] - 1e-6:
                state.update(best_val=value, best_epoch=epoch)
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            pcols = [pm[k] for k in selfcheck.METRICS] if pm else ["", "", ""]
            with open(log_path if dctx.primary else os.devnull, "a", newline="") as f:
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
                        criterion,
                        "" if value is None else value,
                        *pcols,
                        state["best_epoch"] + 1,
                    ]  # fmt: skip
                )
            log.info(
                "epoch %d train %.4f val %.4f recon %.4f (%.0f img/s)%s",
                epoch + 1, tr["loss"], va["loss"], va["recon"], n / secs,
                f" pseudo {1 - value:.4f}" if pm else "",
            )  # fmt: skip
            done = state["epoch"] >= cfg.train.epochs
            since = state["epoch"] - (state["best_epoch"] + 1)
            if cfg.train.patience and state["best_epoch"] >= 0 and since >= cfg.train.patience:
                stopped_early = done = True
            done = dctx.agree(done)
            snapshot = _checkpoint_snapshot(model, best_state, opt, state)
            if dctx.primary and (done or state["epoch"] % cfg.train.checkpoint_every == 0):
                _write_checkpoint(ckpt, snapshot)
            if done:
                break
    except KeyboardInterrupt:
        interrupted = True
        if dctx.primary:
            _write_checkpoint(ckpt, snapshot)  # the last completed epoch, not the partial one
        state.update({k: v for k, v in snapshot[1].items() if k != "param_groups"})
        best_state = {k[5:]: v for k, v in snapshot[0].items() if k.startswith("best.")}
        log.warning("interrupted: resumable checkpoint saved to %s (epoch %d)", ckpt, state["epoch"])
    if not dctx.primary:  # rank 0 alone selects the epoch, checks the model and writes it
        secs = time.perf_counter() - t0
        model_path = run_dir / "model.safetensors"
        return TrainResult(run_dir, model_path, state["epoch"], state["best_val"], stopped_early, interrupted,
                           secs, va_paths, tr_paths)  # fmt: skip

    if state["best_epoch"] >= 0:
        model.load_state_dict(best_state)
    kept = state["best_epoch"] + 1 if state["best_epoch"] >= 0 else state["epoch"]
    selection = {
        "criterion": criterion,
        "epoch": kept,
        "value": state["best_val"] if state["best_epoch"] >= 0 else None,
        "first_eligible_epoch": min_select_epoch(cfg),
        "reason": _select_reason(cfg, state),
    }
    log.info("kept epoch %d: %s", kept, selection["reason"])
    model = model.to(memory_format=torch.contiguous_format).eval()
    final_cfg, map_choice, check = cfg, None, None
    try:
        if not interrupted and (cfg.map.auto or cfg.train.self_check):
            normals = train_set.views()[selfcheck.stats_subset(len(train_set))]
            if cfg.map.auto:
                final_cfg, map_choice = selfcheck.choose_map(model, select_set(), normals, cfg, dev)
            if cfg.train.self_check:
                pset = selfcheck.PseudoSet.build(list(pseudo_views.numpy()), cfg.train.seed * 10 + SEED_CHECK)
                check = selfcheck.self_check(model, pset, normals, final_cfg, dev)
                if val_set is None:
                    check["note"] = "no held-out split: synthetic defects were pasted into training images"
    except KeyboardInterrupt:  # training is complete: resuming redoes only these checks
        interrupted, final_cfg, map_choice, check = True, cfg, None, None
        log.warning("interrupted during the self-check; resume to finish it (%s)", ckpt)
    model = model.cpu()
    training = {
        "data": str(data),
        "fingerprint": fingerprint(train_set.ids),
        "val_fingerprint": fingerprint(val_set.ids) if val_set else None,
        "epochs": state["epoch"],
        "best_epoch": kept,
        "selection": selection,
        "skipped": train_set.skipped,
        "seed": cfg.train.seed,
        "device": str(dev),
        "precision": str(amp).replace("torch.", "") if amp else "fp32",
    }
    if map_choice is not None:
        training["map_auto"] = {**map_choice, "candidates": map_choice["candidates"][:20]}
    if check is not None:
        training["self_check"] = check
    if init is not None or extra_normals:
        training["fine_tune"] = {"init": str(init), "extra_normals": len(extra_normals)}
    training.update(notes or {})
    model_path = run_dir / "model.safetensors"
    save_model(model_path, model, final_cfg, training=training)
    return TrainResult(
        run_dir,
        model_path,
        state["epoch"],
        state["best_val"],
        stopped_early,
        interrupted,
        time.perf_counter() - t0,
        va_paths,
        tr_paths,
        kept,
        selection,
        check,
        map_choice,
    )
