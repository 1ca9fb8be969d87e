"""``cli.options``: the inspecting commands share one set of model options (``with_model_options``) and one
loader (``ModelOptions.load``); ``--help`` stays light (no torch)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import click
import cv2
import numpy as np
import pytest
import typer
from helpers import cli_env

from imganom.cli.main import app
from imganom.cli.options import ModelOptions
from imganom.workflows.demo import WEIGHTS

MODEL_OPTIONS = {"--model", "--roi", "--image-threshold", "--pixel-threshold", "--threshold-source",
                 "--device", "--precision"}  # fmt: skip


def _options(command: str) -> dict[str, click.Parameter]:
    group = typer.main.get_command(app)
    cmd = group.commands[command]  # type: ignore[attr-defined]
    return {name: p for p in cmd.params for name in p.opts}


def test_commands_are_registered() -> None:
    group = typer.main.get_command(app)
    assert set(group.commands) == {  # type: ignore[attr-defined]
        "train", "calibrate", "inspect", "demo", "info", "serve", "watch", "export", "evaluate", "review",
    }  # fmt: skip


@pytest.mark.parametrize("command", ["inspect", "evaluate", "watch", "serve"])
def test_inspecting_commands_share_the_model_options(command: str) -> None:
    opts = _options(command)
    assert MODEL_OPTIONS <= set(opts)
    reference = _options("inspect")
    for name in MODEL_OPTIONS:  # same defaults and help text everywhere
        assert (opts[name].default, opts[name].help) == (reference[name].default, reference[name].help), name
    assert opts["--model"].required and "-m" in opts["--model"].opts


def test_help_does_not_import_torch() -> None:
    code = ("import sys; from imganom.cli.main import app\n"
            "heavy = [m for m in ('torch', 'cv2', 'fastapi', 'numpy') if m in sys.modules]\n"
            "print(','.join(heavy))")  # fmt: skip
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=cli_env(), timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ""


def _exit_code(require_calibrated: bool = False, **kw: object) -> tuple[int, str]:
    """``ModelOptions(**kw).load()``'s exit code (0: loaded) and what it printed (unwrapped)."""
    from imganom.cli.common import console

    with console.capture() as cap:
        try:
            ModelOptions(**kw).load(require_calibrated=require_calibrated)  # type: ignore[arg-type]
            code = 0
        except typer.Exit as e:
            code = e.exit_code
    return code, cap.get().replace("\n", "")


def test_load_model_refuses_bad_options(tmp_path: Path) -> None:
    code, text = _exit_code(model=WEIGHTS, precision="fp64")
    assert code == 2 and "--precision" in text
    code, text = _exit_code(model=WEIGHTS, threshold_source="best")
    assert code == 2 and "--threshold-source" in text
    code, text = _exit_code(model=WEIGHTS, threshold_source="f1_max")  # the demo model has none
    assert code == 2 and "f1_max" in text
    code, text = _exit_code(model=tmp_path / "missing.safetensors")
    assert code == 2 and "missing.safetensors" in text
    (tmp_path / "roi.png").write_bytes(b"not an image")
    code, text = _exit_code(model=WEIGHTS, roi=tmp_path / "roi.png")
    assert code == 2 and "roi.png" in text


def test_load_model_applies_overrides_and_roi(tmp_path: Path) -> None:
    roi = np.zeros((16, 16), np.uint8)
    roi[4:12, 4:12] = 255  # resized to the model's 64 x 64
    cv2.imwrite(str(tmp_path / "roi.png"), roi)
    opts = ModelOptions(
        WEIGHTS, device="cpu", image_threshold=1.5, pixel_threshold=0.25, roi=tmp_path / "roi.png"
    )
    insp = opts.load()
    assert (insp.image_threshold, insp.pixel_threshold) == (1.5, 0.25)
    assert insp.roi.shape == (64, 64) and insp.roi.sum() == 32 * 32 and insp.roi[16:48, 16:48].all()


def test_uncalibrated_model_warns_or_fails(tmp_path: Path) -> None:
    from imganom.formats.modelfile import load_model as read_model
    from imganom.formats.modelfile import save_model

    model, meta, stats = read_model(WEIGHTS)
    raw = tmp_path / "raw.safetensors"
    save_model(raw, model, meta.cfg, training=meta.training, stats=stats)
    code, text = _exit_code(model=raw, device="cpu")
    assert code == 0 and "not calibrated" in text
    code, text = _exit_code(model=raw, device="cpu", require_calibrated=True)
    assert code == 2 and "not calibrated" in text
