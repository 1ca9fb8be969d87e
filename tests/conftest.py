"""Session-wide fixtures for the core-pipeline tests: one small synthetic dataset and one tiny trained model.

Both are built once per test session (the model trains in ~15 s on two CPU cores) and must be treated as
read-only by tests: copy the model file before changing its calibration.
"""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from helpers import TINY_EPOCHS  # noqa: E402

# At most 2 threads, fewer when OMP_NUM_THREADS says so: on a shared 2-core machine 2 threads made tiny
# training steps 5-30x slower than 1 thread (spinning OpenMP workers competing with other processes).
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1, int(os.environ.get("OMP_NUM_THREADS") or 2))))



@pytest.fixture(scope="session")
def synth_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An MVTec-layout synthetic dataset: 48 train/good, 8 test/good, 10 defects (2 per kind), 64 px."""
    from imganom.data.synth import make_dataset

    root = tmp_path_factory.mktemp("synth") / "ds"
    make_dataset(root, n_train=48, n_test_good=8, n_test_defect=10, size=64, seed=0)
    return root


@pytest.fixture(scope="session")
def tiny_model(synth_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The ``tiny`` preset trained 4 epochs on ``synth_root`` and calibrated on its held-out split, exactly as
    ``imganom train`` does; returns the model file path (its run directory holds ``log.csv``)."""
    from imganom.config import load_config
    from imganom.formats.modelfile import update_calibration
    from imganom.inference.inspector import Inspector
    from imganom.training.trainer import train
    from imganom.workflows.calibrate import calibrate

    cfg = load_config("tiny", {"train": {"epochs": TINY_EPOCHS}})
    res = train(cfg, synth_root, tmp_path_factory.mktemp("tiny_run"), device="cpu", progress=False)
    insp = Inspector.load(res.model_path, device="cpu")
    cal, stats = calibrate(insp, res.val_paths)
    update_calibration(res.model_path, cal, stats)
    return res.model_path


@pytest.fixture(scope="session")
def latent_model(tiny_model: Path, synth_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of ``tiny_model`` recalibrated as ``imganom calibrate`` does (thresholds, plus the normals'
    latent statistics, ``ops.latent``) on its synthetic train/good images. Read-only."""
    import shutil

    from imganom.data.discovery import find_images
    from imganom.formats.modelfile import update_calibration
    from imganom.inference.inspector import Inspector
    from imganom.workflows.calibrate import calibrate

    path = tmp_path_factory.mktemp("latent_model") / "model.safetensors"
    shutil.copy(tiny_model, path)
    cal, stats = calibrate(Inspector.load(path, device="cpu"), find_images(synth_root / "train" / "good"),
                           latents=True, keep_stats=True)  # fmt: skip
    update_calibration(path, cal, stats)
    return path


@pytest.fixture(scope="session")
def small_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The integration tests' model (serve, watch, export): ``tiny`` trained 3 epochs on 40 synthetic 64 px
    images, calibrated on its held-out split; also an uncalibrated copy. Read-only, like ``tiny_model``."""
    import shutil

    from imganom.config import load_config
    from imganom.data.synth import make_dataset
    from imganom.formats.modelfile import update_calibration
    from imganom.inference.inspector import Inspector
    from imganom.training.trainer import train
    from imganom.workflows.calibrate import calibrate

    root = tmp_path_factory.mktemp("small_run")
    make_dataset(root / "data", n_train=40, n_test_good=6, n_test_defect=10, size=64, seed=0)
    res = train(load_config("tiny", {"train": {"epochs": 3}}), root / "data", root / "run", progress=False)
    raw = root / "uncalibrated.safetensors"
    shutil.copy(res.model_path, raw)
    cal, stats = calibrate(Inspector.load(res.model_path), res.val_paths)
    update_calibration(res.model_path, cal, stats)
    return {"model": Path(res.model_path), "uncalibrated": raw, "data": root / "data", "root": root}
