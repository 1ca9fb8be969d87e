"""``postprocess.roi: file``: an inspecting command refuses to run such a model without ``--roi``."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import typer

from imganom.cli.common import console
from imganom.cli.options import ModelOptions
from imganom.formats.modelfile import load_model, save_model
from imganom.workflows.demo import WEIGHTS


def _load(**kw: object) -> tuple[int, str]:
    with console.capture() as cap:
        try:
            ModelOptions(**kw).load()  # type: ignore[arg-type]
            code = 0
        except typer.Exit as e:
            code = e.exit_code
    return code, cap.get().replace("\n", "")


def test_roi_file_models_need_a_roi(tmp_path: Path) -> None:
    model, meta, stats = load_model(WEIGHTS)
    post = meta.cfg.postprocess.model_copy(update={"roi": "file"})
    path = tmp_path / "roi_file.safetensors"
    save_model(path, model, meta.cfg.model_copy(update={"postprocess": post}), calibration=meta.calibration,
               stats=stats)  # fmt: skip
    code, text = _load(model=path, device="cpu")
    assert code == 2 and "--roi" in text and "roi_file.safetensors" in text
    roi = np.zeros((16, 16), np.uint8)
    roi[4:12, 4:12] = 255
    cv2.imwrite(str(tmp_path / "roi.png"), roi)
    assert _load(model=path, device="cpu", roi=tmp_path / "roi.png")[0] == 0
    assert _load(model=WEIGHTS, device="cpu")[0] == 0  # roi none: as before
