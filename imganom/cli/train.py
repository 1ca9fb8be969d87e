"""``imganom train``: train a VAE on normal images, then calibrate it on the held-out split."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import typer

from imganom.cli.common import EXIT_INTERRUPTED, console, fail, setup


def _overrides(epochs: int | None, seed: int | None, precision: str | None, batch_size: int | None) -> dict:
    t = {
        k: v
        for k, v in {"epochs": epochs, "seed": seed, "precision": precision, "batch_size": batch_size}.items()
        if v is not None
    }
    return {"train": t} if t else {}


def train(
    data: Path = typer.Option(
        ..., "--data", help="Folder of normal images, or an MVTec root (uses train/good)."
    ),
    config: str = typer.Option(
        "default", "--config", "-c", help="Preset name, YAML path, or auto (chosen from the data)."
    ),
    out: Path = typer.Option(Path("runs/latest"), "--out", help="Run directory."),
    resume: bool = typer.Option(False, "--resume", help="Continue from RUN_DIR/checkpoint.safetensors."),
    device: str = typer.Option("auto", "--device"),
    precision: str | None = typer.Option(None, "--precision", help="auto|fp32|bf16|fp16 (overrides config)."),
    epochs: int | None = typer.Option(None, "--epochs"),
    batch_size: int | None = typer.Option(None, "--batch-size"),
    seed: int | None = typer.Option(None, "--seed"),
    calibrate_after: bool = typer.Option(
        True, "--calibrate/--no-calibrate", help="Calibrate thresholds on the held-out normal split."
    ),
    nproc: int = typer.Option(
        1, "--nproc", min=1, help="Train data-parallel in N processes on this machine (runs torchrun, DDP)."
    ),
    resume_from: Path | None = typer.Option(
        None,
        "--resume-from",
        help="Fine-tune this model (its config; --config is ignored) on --data plus --add-normals.",
    ),
    add_normals: str | None = typer.Option(
        None,
        "--add-normals",
        help="With --resume-from: reviewed inspect folders (DIR[,DIR...]); their confirmed false alarms are "
        "added to the training images, part of the reviewed normals is held out to compare before/after.",
    ),
    holdout: float = typer.Option(0.5, "--holdout", help="Share of the reviewed normals held out."),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Train a VAE on normal images; writes RUN_DIR/model.safetensors (calibrated)."""
    setup(verbose)
    from imganom.training.distributed import is_primary, torchrun_command, world_notes

    if nproc > 1 and (resume_from is not None or add_normals is not None):
        fail("--resume-from/--add-normals fine-tune in one process: drop --nproc")
    if nproc > 1 and "WORLD_SIZE" not in os.environ:  # under torchrun already: this is one of its ranks
        raise typer.Exit(subprocess.run(torchrun_command(sys.argv[1:], nproc)).returncode)
    if resume_from is not None or add_normals is not None:
        return _fine_tune(resume_from, add_normals, data, out, epochs, holdout, device)
    from imganom.config import ConfigError
    from imganom.training.autoconfig import resolve_config

    try:
        cfg, auto = resolve_config(config, data, _overrides(epochs, seed, precision, batch_size))
    except (ConfigError, FileNotFoundError, ValueError) as e:
        fail(str(e))
    for line in (auto or {}).get("reasons", []):
        console.print(f"config auto: {line}")
    # torch-heavy imports only once the config is valid: config errors are reported in well under a second
    from imganom.formats.modelfile import update_calibration
    from imganom.inference.inspector import Inspector
    from imganom.training.trainer import train as run_train
    from imganom.workflows.calibrate import calibrate

    try:
        from imganom.cli.progress import train_progress

        with train_progress(sys.stderr.isatty() and is_primary()) as on_progress:
            notes = ({"auto_config": auto} if auto else {}) | world_notes()
            res = run_train(cfg, data, out, resume=resume, device=device, progress=on_progress, notes=notes)
    except (FileNotFoundError, ValueError) as e:
        fail(str(e))
    if not is_primary():
        return  # torchrun rank > 0: rank 0 reports, calibrates and prints the model path
    console.print(res.summary)
    if res.interrupted:
        console.print(f"interrupted: resume with  imganom train --data {data} --out {out} --resume")
        raise typer.Exit(EXIT_INTERRUPTED)
    if calibrate_after:
        cal_paths = res.val_paths
        if len(cal_paths) < 2:
            console.print("[yellow]warning:[/yellow] no held-out split; calibrating on the training images")
            from imganom.training.trainer import training_images

            cal_paths = training_images(data)[0]
        insp = Inspector.load(res.model_path, device=device)
        cal, stats = calibrate(insp, cal_paths, stats_paths=res.train_paths or None, latents=True)
        update_calibration(res.model_path, cal, stats)
        console.print(
            f"calibrated on {cal['n_images']} held-out normal images: image threshold "
            f"{cal['image_threshold']:.4g}, pixel threshold {cal['pixel_threshold']:.4g}"
        )
        if "warning" in cal["image_info"]:
            console.print(f"[yellow]warning:[/yellow] {cal['image_info']['warning']}")
    for level, line in res.check_lines():
        console.print(("[yellow]warning:[/yellow] " if level == "warning" else "") + line)
    print(res.model_path)


def _fine_tune(
    model: Path | None, dirs: str | None, data: Path, out: Path, epochs: int | None, holdout: float,
    device: str,
) -> None:  # fmt: skip
    """``train --resume-from M --add-normals DIR``: fine-tune on reviewed false alarms, then recalibrate."""
    if model is None or not dirs:
        fail("--resume-from MODEL and --add-normals DIR go together")
    from imganom.formats.modelfile import ModelFileError
    from imganom.workflows.review_loop import finetune_on_reviews

    try:
        rep = finetune_on_reviews(model, data, [Path(d) for d in dirs.split(",") if d], out, epochs=epochs,
                                  holdout=holdout, device=device)  # fmt: skip
    except (FileNotFoundError, ValueError, ModelFileError) as e:
        fail(str(e))
    n, ep = rep["added_false_alarms"], rep["epochs"]
    console.print(f"fine-tuned on {n} confirmed false alarms plus the original normals ({ep} epochs)")
    if rep["before"] is not None:
        b, a = rep["before"], rep["after"]
        console.print(
            f"false-alarm rate on {b['n']} held-out reviewed normals: "
            f"{100 * b['false_alarm_rate']:.1f}% before (threshold {b['image_threshold']:.4g}), "
            f"{100 * a['false_alarm_rate']:.1f}% after (threshold {a['image_threshold']:.4g})",
            soft_wrap=True,
        )
    print(rep["model_path"])
