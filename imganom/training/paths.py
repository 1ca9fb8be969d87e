"""Which images a run trains on: ``train/good`` of an MVTec root (else the folder), capped and split."""

from __future__ import annotations

from pathlib import Path

from imganom.config import Config
from imganom.data.discovery import normal_images, relative_id, train_val_split


def training_images(data: str | Path) -> tuple[list[Path], list[str]]:
    """Normal training images: ``train/good`` of an MVTec root, else every image under the folder."""
    root, paths = normal_images(data)
    return paths, [relative_id(p, root) for p in paths]


def split_images(
    cfg: Config, data: str | Path
) -> tuple[tuple[list[Path], list[str]], tuple[list[Path], list[str]]]:
    """The run's ((train paths, ids), (held-out paths, ids)): ``train.max_images``, then the seeded split."""
    paths, ids = training_images(data)
    if cfg.train.max_images:
        paths, ids = paths[: cfg.train.max_images], ids[: cfg.train.max_images]
    tr, va = train_val_split(list(range(len(paths))), cfg.train.val_fraction, cfg.train.seed)
    return ([paths[i] for i in tr], [ids[i] for i in tr]), ([paths[i] for i in va], [ids[i] for i in va])
