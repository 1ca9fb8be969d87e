"""``imganom demo``: synthetic parts, the shipped demo model, a full inspection and its report. No downloads.

The demo model in ``weights/demo.safetensors`` is trained by ``tools/train_demo.py`` with this module's
``DATA`` settings, so regenerating the same synthetic data gives the images the model was made for.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from imganom.config import load_config

WEIGHTS = Path(__file__).resolve().parent.parent / "assets" / "demo.safetensors"
DATA = {
    "n_train": 120,
    "n_test_good": 20,
    "n_test_defect": 25,
    "size": 64,
    "channels": 1,
    "texture": "weave",
    "seed": 7,
}
CONFIG = "tiny"
TRAIN_OVERRIDES = {"train": {"epochs": 25, "seed": 0}}


def make_demo_data(root: Path) -> Path:
    """Write the demo's synthetic MVTec-layout dataset under ``root`` (idempotent)."""
    from imganom.data.synth import make_dataset

    if not (root / "test").is_dir():
        make_dataset(root, **DATA)
    return root


def train_demo_model(data: Path, run_dir: Path) -> Path:
    """Train and calibrate the demo model (about a minute on a laptop CPU)."""
    from imganom.formats.modelfile import update_calibration
    from imganom.inference.inspector import Inspector
    from imganom.training.trainer import train
    from imganom.workflows.calibrate import calibrate

    res = train(load_config(CONFIG, TRAIN_OVERRIDES), data, run_dir, progress=False)
    insp = Inspector.load(res.model_path)
    cal, stats = calibrate(insp, res.val_paths, stats_paths=res.train_paths or None, latents=True)
    update_calibration(res.model_path, cal, stats)
    return res.model_path


def run_demo(
    out: str | Path, train_if_missing: bool = True, log: Callable[[str], None] = print
) -> tuple[dict, Path]:
    """Generate data, load (or train) the demo model, inspect the test set; returns (summary, report)."""
    from imganom.inference.inspector import Inspector
    from imganom.workflows.inspect import run_inspect

    out = Path(out)
    data = make_demo_data(out / "data")
    log(f"synthetic dataset: {data}")
    model = WEIGHTS
    if not model.is_file():
        if not train_if_missing:
            raise FileNotFoundError(f"demo weights not found: {WEIGHTS}")
        log("demo weights not found; training the demo model (about a minute)...")
        model = train_demo_model(data, out / "run")
    log(f"model: {model}")
    insp = Inspector.load(model)
    _, summary = run_inspect(insp, [data / "test"], out / "results", workers=0)
    return summary, out / "results" / "report.html"
