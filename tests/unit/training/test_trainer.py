"""Training: loss goes down, determinism, exact resume, augmentation, early stopping, the ``train`` CLI."""

from __future__ import annotations

import _thread
import csv
import json
import signal
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from helpers import TINY_EPOCHS, cli_env, imganom_cmd
from safetensors.torch import load_file

from imganom.config import CONFIG_DIR, AugmentConfig, load_config
from imganom.data.discovery import find_images
from imganom.formats.modelfile import load_model, read_meta, update_calibration
from imganom.inference.inspector import Inspector
from imganom.ops.head import AnomalyHead
from imganom.training.dataset import NormalImages, build_augment
from imganom.training.trainer import LOG_COLUMNS, train

# a fast variant of the tiny preset: 16 images (12 train / 4 val), 2 batches per epoch
FAST = {"train": {"max_images": 16, "batch_size": 8, "val_fraction": 0.25, "epochs": 2}}


def _fast_cfg(**train_kw):
    over = {**FAST, "train": {**FAST["train"], **train_kw}}
    return load_config("tiny", over)


def _log_rows(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "log.csv", newline="") as f:
        return list(csv.DictReader(f))


def _assert_same_tensors(a: Path, b: Path, prefix: str = "") -> None:
    ta, tb = load_file(str(a)), load_file(str(b))
    keys = sorted(k for k in ta if k.startswith(prefix))
    assert keys and keys == sorted(k for k in tb if k.startswith(prefix))
    for k in keys:
        assert torch.equal(ta[k], tb[k]), k


def test_log_has_one_row_per_epoch_and_loss_decreases(tiny_model: Path) -> None:
    rows = _log_rows(tiny_model.parent)
    assert list(rows[0]) == LOG_COLUMNS
    assert [int(r["epoch"]) for r in rows] == list(range(1, TINY_EPOCHS + 1))
    recon = [float(r["train_recon"]) for r in rows]
    val = [float(r["val_loss"]) for r in rows]
    assert recon[-1] < 0.8 * recon[0], recon
    assert val[-1] < val[0], val  # val loss uses the full KL weight, so epochs compare directly
    assert all(float(r["images_per_s"]) > 0 and float(r["seconds"]) > 0 for r in rows)
    betas = [float(r["beta"]) for r in rows]
    assert betas == sorted(betas) and betas[-1] == pytest.approx(load_config("tiny").loss.beta)
    assert {r["criterion"] for r in rows} == {"val_recon"}
    warm = load_config("tiny").loss.kl_warmup_epochs
    assert all(r["select_value"] == "" and r["kept_epoch"] == "0" for r in rows[: warm - 1])  # warm-up
    assert all(float(r["select_value"]) == float(r["val_recon"]) for r in rows[warm - 1 :])
    kept = int(rows[-1]["kept_epoch"])
    assert kept >= warm and float(rows[kept - 1]["val_recon"]) == min(
        float(r["val_recon"]) for r in rows[warm - 1 :]
    )
    meta = read_meta(tiny_model)
    sel = meta.training["selection"]
    assert meta.training["best_epoch"] == sel["epoch"] == kept and sel["criterion"] == "val_recon"
    assert sel["first_eligible_epoch"] == warm and "reconstruction" in sel["reason"]
    check = meta.training["self_check"]
    assert check["n_anomalous"] == 4 * check["n_normal"] and 0 <= check["image_auroc"] <= 1
    assert set(check["per_family"]) == {"cutpaste", "perlin", "blob", "scratch"}
    base = check["baseline"]  # the average normal image as reconstruction: another, model-free number
    assert set(base) == {"image_auroc", "pixel_auroc", "aupro"} and base != {k: check[k] for k in base}
    # precision "auto" on the CPU: bf16 autocast where the CPU has native bf16, else fp32
    from imganom.utils.device import cpu_has_native_bf16

    auto = "bfloat16" if cpu_has_native_bf16() else "fp32"
    assert meta.training["epochs"] == TINY_EPOCHS and meta.training["precision"] == auto
    assert meta.training["fingerprint"]["count"] + meta.training["val_fingerprint"]["count"] == 48
    assert meta.calibration is not None and meta.calibration["n_images"] == 10


def test_same_seed_gives_identical_weights(synth_root: Path, tmp_path: Path) -> None:
    cfg = _fast_cfg()
    a = train(cfg, synth_root, tmp_path / "a", device="cpu", progress=False)
    b = train(cfg, synth_root, tmp_path / "b", device="cpu", progress=False)
    _assert_same_tensors(a.model_path, b.model_path)
    _assert_same_tensors(a.run_dir / "checkpoint.safetensors", b.run_dir / "checkpoint.safetensors")
    assert a.best_val == b.best_val
    # and a different seed really gives a different model
    c = train(_fast_cfg(seed=1, epochs=1), synth_root, tmp_path / "c", device="cpu", progress=False)
    ta, tc = load_file(str(a.model_path)), load_file(str(c.model_path))
    assert not torch.equal(ta["vae.to_stats.weight"], tc["vae.to_stats.weight"])


def _interrupt_mid_epoch(log_path: Path, n_rows: int, stop: threading.Event) -> None:
    """Ctrl-C (KeyboardInterrupt in the main thread) about half-way through epoch ``n_rows + 1``."""
    while not stop.is_set():
        if log_path.exists():
            rows = log_path.read_text().splitlines()[1:]
            if len(rows) >= n_rows:
                secs = float(rows[-1].split(",")[LOG_COLUMNS.index("seconds")])
                time.sleep(0.5 * secs)  # half the last epoch's duration
                _thread.interrupt_main()
                return
        time.sleep(0.005)


def test_resume_after_interrupt_is_exact(synth_root: Path, tmp_path: Path) -> None:
    cfg = _fast_cfg(epochs=4, checkpoint_every=1)
    straight = train(cfg, synth_root, tmp_path / "straight", device="cpu", progress=False)
    assert straight.epochs_run == 4 and not straight.interrupted

    run = tmp_path / "resumed"
    stop = threading.Event()
    watcher = threading.Thread(target=_interrupt_mid_epoch, args=(run / "log.csv", 2, stop), daemon=True)
    watcher.start()
    try:
        first = train(cfg, synth_root, run, device="cpu", progress=False)
    finally:
        stop.set()
        watcher.join()
    assert first.interrupted and 2 <= first.epochs_run < 4
    assert len(_log_rows(run)) == first.epochs_run
    # as if a crash came after the next epoch was logged but before its checkpoint: resume redoes it
    with open(run / "log.csv", "a") as f:
        f.write(f"{first.epochs_run + 1}," + ",".join(["9"] * (len(LOG_COLUMNS) - 1)) + "\n")
    second = train(cfg, synth_root, run, resume=True, device="cpu", progress=False)
    assert second.epochs_run == 4 and not second.interrupted
    _assert_same_tensors(straight.model_path, second.model_path)
    _assert_same_tensors(straight.run_dir / "checkpoint.safetensors", run / "checkpoint.safetensors")
    assert [r["epoch"] for r in _log_rows(run)] == ["1", "2", "3", "4"]
    assert [r["val_loss"] for r in _log_rows(run)] == [r["val_loss"] for r in _log_rows(straight.run_dir)]


def test_resume_refuses_other_config_or_missing_checkpoint(synth_root: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train(_fast_cfg(epochs=1), synth_root, tmp_path / "none", resume=True, device="cpu", progress=False)
    train(_fast_cfg(epochs=1), synth_root, tmp_path / "r", device="cpu", progress=False)
    with pytest.raises(ValueError, match="config differs"):
        train(
            _fast_cfg(epochs=1, lr=0.01),
            synth_root,
            tmp_path / "r",
            resume=True,
            device="cpu",
            progress=False,
        )


def test_early_stopping_with_patience(synth_root: Path, tmp_path: Path) -> None:
    # a learning rate of 1e-9 and no batch norm keep the val loss flat: the first epoch after the KL warm-up
    # (tiny: 2) is the best, then 2 bad epochs
    cfg = load_config(
        "tiny",
        {
            **FAST,
            "model": {"norm": "none"},
            "train": {**FAST["train"], "lr": 1e-9, "epochs": 10, "patience": 2},
        },
    )
    res = train(cfg, synth_root, tmp_path / "es", device="cpu", progress=False)
    assert res.stopped_early and res.epochs_run == 4
    assert len(_log_rows(res.run_dir)) == 4
    assert read_meta(res.model_path).training["best_epoch"] == res.best_epoch == 2


def test_augmentation_ops_from_config() -> None:
    import albumentations as A

    cfg = AugmentConfig(
        hflip=0.5, vflip=0.25, shift=0.05, rotate=5, affine_p=0.3, brightness=0.1, contrast=0.2,
        brightness_contrast_p=0.4, noise_std=0.05, noise_p=0.2,
    )  # fmt: skip
    aug = build_augment(cfg, seed=0)
    ops = list(aug.transforms)
    assert [type(t) for t in ops] == [
        A.HorizontalFlip, A.VerticalFlip, A.Affine, A.RandomBrightnessContrast, A.GaussNoise,
    ]  # fmt: skip
    assert [t.p for t in ops] == [0.5, 0.25, 0.3, 0.4, 0.2]
    off = AugmentConfig(hflip=0, vflip=0, affine_p=0, brightness_contrast_p=0, noise_p=0)
    assert build_augment(off) is None
    # the tiny preset turns affine and brightness/contrast off: a flip only
    assert [type(t) for t in build_augment(load_config("tiny").augment).transforms] == [A.HorizontalFlip]
    # probabilities without a magnitude add nothing
    assert (
        build_augment(AugmentConfig(hflip=0, shift=0, rotate=0, affine_p=1, brightness_contrast_p=0)) is None
    )


def test_augmentation_is_deterministic_per_seed_epoch_index(synth_root: Path) -> None:
    strong = {
        "augment": {"hflip": 0.5, "vflip": 0.5, "shift": 0.1, "rotate": 10, "affine_p": 1.0,
                    "brightness_contrast_p": 1.0, "noise_std": 0.05, "noise_p": 1.0},
    }  # fmt: skip
    cfg = load_config("tiny", strong)
    paths = find_images(synth_root / "train" / "good")[:6]
    ids = [p.name for p in paths]
    ds = NormalImages(paths, ids, cfg, train=True)
    first = [ds[i] for i in range(6)]
    assert all(x.shape == (1, 64, 64) and x.dtype == torch.float32 for x in first)
    assert all(0 <= float(x.min()) and float(x.max()) <= 1 for x in first)
    # same (seed, epoch, index): same sample, whatever the call order or the dataset instance
    assert all(torch.equal(ds[i], first[i]) for i in reversed(range(6)))
    other = NormalImages(paths, ids, cfg, train=True)
    assert torch.equal(other[4], first[4])
    # a DataLoader with worker processes yields exactly the same samples
    loader = torch.utils.data.DataLoader(other, batch_size=3, num_workers=2, shuffle=False)
    assert torch.equal(torch.cat(list(loader)), torch.stack(first))
    # another epoch or another seed draws other augmentations
    ds.epoch = 1
    assert not torch.equal(ds[0], first[0])
    ds.epoch = 0
    assert torch.equal(ds[0], first[0])
    reseeded = NormalImages(paths, ids, load_config("tiny", {**strong, "train": {"seed": 5}}), train=True)
    assert not torch.equal(reseeded[0], first[0])
    # evaluation views are never augmented
    ev = NormalImages(paths, ids, cfg, train=False)
    assert ev.augment is None and torch.equal(ev[0], ev[0])
    assert not any(torch.equal(ev[i], first[i]) for i in range(6))


def _write_cfg(path: Path, **train_kw) -> Path:
    data = yaml.safe_load((CONFIG_DIR / "tiny.yaml").read_text())
    data["train"].update(FAST["train"], **train_kw)
    path.write_text(yaml.safe_dump(data))
    return path


def test_cli_train_bad_config_exits_2(synth_root: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\ntrain: {epochs: 2, learning_rate: 0.1}\nmodel: {depth: 3}\n")
    cmd = imganom_cmd("train", "--data", str(synth_root), "--config", str(bad), "--out", str(tmp_path / "r"))
    p = subprocess.run(cmd, capture_output=True, text=True, env=cli_env(), timeout=120)
    assert p.returncode == 2
    assert "train.learning_rate" in p.stderr and str(bad) in p.stderr.replace("\n", "")
    assert "Traceback" not in p.stderr
    assert not (tmp_path / "r" / "model.safetensors").exists()
    # a bad override from the command line is a config error too
    cmd = imganom_cmd("train", "--data", str(synth_root), "--config", "tiny", "--precision", "fp64")
    p = subprocess.run(cmd, capture_output=True, text=True, env=cli_env(), timeout=120)
    assert p.returncode == 2 and "train.precision" in p.stderr


def test_cli_train_sigint_then_resume_writes_calibrated_model(synth_root: Path, tmp_path: Path) -> None:
    epochs = 8
    cfg = _write_cfg(tmp_path / "fast.yaml", epochs=epochs, checkpoint_every=5)
    out = tmp_path / "run"
    base = ["train", "--data", str(synth_root), "--config", str(cfg), "--out", str(out), "--device", "cpu"]
    proc = subprocess.Popen(
        imganom_cmd(*base), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cli_env()
    )
    log_path = out / "log.csv"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if log_path.exists() and log_path.read_text().count("\n") >= 2:  # header + first epoch
            break
        time.sleep(0.01)
    assert proc.poll() is None, "training finished before it could be interrupted"
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert "--resume" in stderr and "Traceback" not in stderr
    assert (out / "checkpoint.safetensors").is_file()
    from safetensors import safe_open

    with safe_open(str(out / "checkpoint.safetensors"), "pt") as f:
        saved_epoch = json.loads(f.metadata()["imganom_ckpt"])["epoch"]
    # the checkpoint holds the last completed epoch; the log has its rows plus at most the row of an epoch
    # interrupted between logging and snapshotting (resume drops that row and redoes the epoch)
    rows = _log_rows(out)
    assert [int(r["epoch"]) for r in rows[:saved_epoch]] == list(range(1, saved_epoch + 1))
    assert len(rows) - saved_epoch in (0, 1) and saved_epoch < epochs

    p = subprocess.run(
        imganom_cmd(*base, "--resume"), capture_output=True, text=True, env=cli_env(), timeout=180
    )
    assert p.returncode == 0, p.stderr
    assert [int(r["epoch"]) for r in _log_rows(out)] == list(range(1, epochs + 1))
    model_path = Path(p.stdout.strip().splitlines()[-1])
    assert model_path == out / "model.safetensors"
    _, meta, _ = load_model(model_path)
    assert meta.cfg.train.max_images == 16 and meta.training["epochs"] == epochs
    assert np.isfinite(meta.training["selection"]["value"])
    cal = meta.calibration
    assert cal["n_images"] == 4 and cal["image_threshold"] > 0 and cal["pixel_threshold"] > 0
    assert "calibrated on 4 held-out normal images" in p.stderr
    assert Inspector.load(model_path, device="cpu").calibrated
    assert f"kept epoch {meta.training['best_epoch']}: lowest validation reconstruction loss" in p.stderr
    # the run ends with the self-check on synthetic defects, after the calibration
    assert p.stderr.index("self-check on synthetic defects: image AUROC ") > p.stderr.index("calibrated on")


def test_kl_dominated_run_keeps_a_trained_epoch_not_epoch_1(synth_root: Path, tmp_path: Path) -> None:
    # Issue 11: once KL (at full beta) outweighs the reconstruction gains, the validation ELBO is lowest at
    # epoch 1 (beta still small, KL ~ 0, the model untrained), so selecting on it kept the epoch-1 weights.
    cfg = load_config(
        "tiny",
        {
            "model": {"latent_dim": 64},
            "loss": {"beta": 100.0, "kl_warmup_epochs": 3},
            "train": {"batch_size": 4, "val_fraction": 0.25, "epochs": 6, "self_check": False},
        },
    )
    res = train(cfg, synth_root, tmp_path / "kl", device="cpu", progress=False)
    rows = _log_rows(res.run_dir)
    elbo = [float(r["val_loss"]) for r in rows]
    recon = [float(r["val_recon"]) for r in rows]
    kept = res.best_epoch
    assert kept >= 3 and kept == int(rows[-1]["kept_epoch"])  # never inside the warm-up
    assert elbo[0] < elbo[kept - 1]  # the failure is reproduced: the old criterion preferred epoch 1 ...
    assert recon[kept - 1] < recon[0] - 0.05  # ... whose reconstructions are far worse
    assert recon[kept - 1] == min(recon[2:])
    sel = read_meta(res.model_path).training["selection"]
    assert sel["epoch"] == kept and sel["value"] == pytest.approx(recon[kept - 1])


def test_progress_callback_sees_every_batch(synth_root: Path, tmp_path: Path) -> None:
    seen = []
    train(_fast_cfg(self_check=False), synth_root, tmp_path / "p", device="cpu", progress=seen.append)
    assert [(p.epoch, p.done, p.total) for p in seen] == [(1, 8, 12), (1, 12, 12), (2, 8, 12), (2, 12, 12)]
    assert all(p.epochs == 2 and p.loss > 0 and p.images_per_s > 0 for p in seen)


def test_pseudo_selection_map_auto_and_self_check(synth_root: Path, tmp_path: Path) -> None:
    from imganom.training import selfcheck

    cfg = load_config(
        "tiny",
        {
            **FAST,
            "train": {**FAST["train"], "epochs": 5, "select": "pseudo", "pseudo_every": 2},
            "map": "auto",
        },
    )
    res = train(cfg, synth_root, tmp_path / "ps", device="cpu", progress=False)
    rows = _log_rows(res.run_dir)
    measured = [int(r["epoch"]) for r in rows if r["select_value"]]
    assert measured == [2, 4, 5]  # from the end of the warm-up (2), every 2 epochs, and the last
    assert all(r["pseudo_image_auroc"] == "" for r in rows if int(r["epoch"]) not in measured)
    scores = {
        int(r["epoch"]): np.mean([float(r[f"pseudo_{k}"]) for k in selfcheck.METRICS])
        for r in rows
        if r["select_value"]
    }
    assert res.best_epoch == max(scores, key=scores.get)
    assert float(rows[res.best_epoch - 1]["select_value"]) == pytest.approx(1 - scores[res.best_epoch])
    _, meta, _ = load_model(res.model_path)
    tr = meta.training
    assert tr["selection"]["criterion"] == "pseudo" and "pseudo-anomaly" in tr["selection"]["reason"]
    chosen = tr["map_auto"]["chosen"]
    m, pp = meta.cfg.map, meta.cfg.postprocess
    assert not m.auto and (m.l1, m.ssim, m.standardize, m.scales) == (
        chosen["l1"], chosen["ssim"], chosen["standardize"], chosen["scales"]
    )  # fmt: skip
    assert (pp.sigma, pp.score) == (chosen["sigma"], chosen["score"])
    cands = tr["map_auto"]["candidates"]
    assert cands[0]["mean"] == max(c["mean"] for c in cands)
    own = {
        "l1": 0.5,
        "l2": 0.0,
        "ssim": 0.5,
        "channel_reduce": "mean",
        "standardize": "off",
        "scales": [],
        "sigma": 1.0,
        "score": "max",
    }  # fmt: skip  (map: auto starts from the schema's map, tiny's sigma)
    own_mean = next(c["mean"] for c in cands if c["setting"] == own)
    if cands[0]["mean"] >= own_mean + selfcheck.MARGIN:
        assert chosen == cands[0]["setting"] and "best mean pseudo metric" in tr["map_auto"]["reason"]
    else:
        assert chosen == own and "kept the configured setting" in tr["map_auto"]["reason"]
    assert res.self_check == tr["self_check"] and res.map_choice["chosen"] == chosen
    lines = [t for _, t in res.check_lines()]
    assert lines[0].startswith("map: auto chose") and lines[1].startswith("self-check on synthetic defects")


def test_self_check_maps_are_the_inspectors(synth_root: Path, tmp_path: Path) -> None:
    """The pseudo-validation scores exactly the maps the calibrated model file produces."""
    from imganom.training import selfcheck
    from imganom.workflows.calibrate import calibrate

    cfg = load_config("tiny", {**FAST, "map": {"standardize": "score", "scales": [4.0]}})
    res = train(cfg, synth_root, tmp_path / "c", device="cpu", progress=False)
    cal, stats = calibrate(
        Inspector.load(res.model_path, device="cpu"), res.val_paths, stats_paths=res.train_paths
    )
    update_calibration(res.model_path, cal, stats)
    insp = Inspector.load(res.model_path, device="cpu")
    normals = NormalImages(res.train_paths, [p.name for p in res.train_paths], cfg, train=False).views()
    pset = selfcheck.PseudoSet.build(
        list(NormalImages(res.val_paths, [p.name for p in res.val_paths], cfg, train=False).views().numpy()),
        0,
    )
    want = insp.model_maps_scored(pset.images)
    want_maps, want_scores = want.maps, want.score_maps
    plain = AnomalyHead(cfg)  # no statistics: the raw map
    raw_n = selfcheck.raw_maps(plain, normals, selfcheck.reconstruct(insp.model, normals, insp.device))
    mine = selfcheck.normal_statistics(raw_n, cfg.map, cfg.postprocess.sigma)
    assert set(mine) == set(stats) and all(torch.allclose(mine[k], stats[k], atol=1e-6) for k in stats)
    raw = selfcheck.raw_maps(plain, pset.images, selfcheck.reconstruct(insp.model, pset.images, insp.device))
    ho = selfcheck.head_output(AnomalyHead(cfg, mine), raw)
    maps, score_maps = ho.maps, ho.score_maps
    assert torch.allclose(maps, want_maps, atol=1e-5) and torch.allclose(score_maps, want_scores, atol=1e-5)
    # and the stored self-check used these statistics too: recomputing it gives the same numbers
    again = selfcheck.self_check(insp.model, selfcheck.PseudoSet.build(list(pset.images[:4].numpy()), 2),
                                 normals, cfg, insp.device)  # fmt: skip
    assert 0 <= again["image_auroc"] <= 1 and again["n_normal"] == 4


def test_denoising_pairs_are_deterministic(synth_root: Path, tmp_path: Path) -> None:
    cfg = load_config("tiny", {"train": {"denoise": 0.5}})
    paths = find_images(synth_root / "train" / "good")[:12]
    ds = NormalImages(paths, [p.name for p in paths], cfg, train=True)
    pairs = [ds[i] for i in range(12)]
    corrupted = [i for i, (x, y) in enumerate(pairs) if not torch.equal(x, y)]
    assert 2 <= len(corrupted) <= 10  # about half
    assert all(torch.equal(ds[i][0], pairs[i][0]) for i in range(12))  # same (seed, epoch, index)
    # the target is the plain augmented image: the same as without denoising
    plain = NormalImages(paths, [p.name for p in paths], load_config("tiny"), train=True)
    assert all(torch.equal(plain[i], pairs[i][1]) for i in range(12))
    assert NormalImages(paths, [p.name for p in paths], cfg, train=False)[0].dim() == 3  # eval: no pairs
    res = train(load_config("tiny", {**FAST, "train": {**FAST["train"], "denoise": 0.5, "epochs": 1}}),
                synth_root, tmp_path / "dn", device="cpu", progress=False)  # fmt: skip
    assert np.isfinite(float(_log_rows(res.run_dir)[0]["train_loss"]))


def test_interrupt_during_the_self_check_resumes_only_the_check(
    synth_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from imganom.training import selfcheck

    real = selfcheck.self_check

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(selfcheck, "self_check", interrupted)
    first = train(_fast_cfg(), synth_root, tmp_path / "r", device="cpu", progress=False)
    assert first.interrupted and first.epochs_run == 2 and first.self_check is None
    monkeypatch.setattr(selfcheck, "self_check", real)
    second = train(_fast_cfg(), synth_root, tmp_path / "r", resume=True, device="cpu", progress=False)
    assert not second.interrupted and second.self_check is not None and len(_log_rows(second.run_dir)) == 2
    assert (
        read_meta(second.model_path).training["self_check"]["image_auroc"] == second.self_check["image_auroc"]
    )
