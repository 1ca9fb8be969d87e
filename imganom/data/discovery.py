"""Dataset discovery: find image files, scan MVTec-style layouts, split train/val, expand CLI inputs.

Item ids are posix paths relative to a root, so equal file names in different folders never collide; file-name
bytes that are not UTF-8 appear in ids as ``\\xNN`` (``names.printable``), the paths themselves open the file.
Nothing is dropped silently: entries that cannot be inspected (dangling symlinks, symlink loops, folders that
cannot be listed, folder links back into their own ancestors) are listed, and the reader names the cause when
one is opened. Nothing here decodes pixels; readers live in ``imganom.data.readers``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import numpy as np

from imganom.data.names import printable
from imganom.data.readers import IMAGE_EXTENSIONS

T = TypeVar("T")
LIST_SUFFIXES = (".txt", ".lst")


def _norm_exts(extensions: Iterable[str]) -> tuple[str, ...]:
    return tuple(e.lower() if e.startswith(".") else "." + e.lower() for e in extensions)


def _has_ext(name: str, exts: tuple[str, ...]) -> bool:
    return name.lower().endswith(exts)


def _strip_ext(name: str) -> str:
    """File name without its image extension (``a.nii.gz`` -> ``a``)."""
    low = name.lower()
    for e in sorted(IMAGE_EXTENSIONS, key=len, reverse=True):
        if low.endswith(e):
            return name[: -len(e)]
    return os.path.splitext(name)[0]


def find_images(
    root: str | Path, *, recursive: bool = True, extensions: Iterable[str] = IMAGE_EXTENSIONS
) -> list[Path]:
    """Image files under ``root`` sorted by relative posix path; hidden files and folders are skipped.

    Extensions compare case-insensitively (``.PNG`` matches) and may be given with or without the dot.
    Symlinked folders are followed once (a folder reached twice is walked once). Listed too, so that they
    become error rows rather than vanish: entries with an image extension that are not readable files
    (dangling symlinks, symlink loops, special files), folders that cannot be listed (``root`` itself
    included) and folder links pointing back to a folder that contains them (a loop, not followed).
    """
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"{root}: folder not found")
    if not root.is_dir():
        raise NotADirectoryError(f"{root}: not a folder")
    exts = _norm_exts(extensions)
    found: list[Path] = []
    visited: set[tuple[int, int]] = set()

    def walk(folder: Path, chain: frozenset[tuple[int, int]]) -> None:
        try:
            with os.scandir(folder) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError:
            found.append(folder)  # unreadable: the reader says why
            return
        for e in entries:
            if e.name.startswith("."):
                continue
            p = folder / e.name
            if not _is_dir(e):
                if _has_ext(e.name, exts):
                    found.append(p)
                continue
            if not recursive:
                continue
            key = _dir_key(p)
            if key is None or key in chain:
                found.append(p)  # vanished while listing, or a link back into its own ancestors
            elif key not in visited:
                visited.add(key)
                walk(p, chain | {key})

    top = _dir_key(root)
    visited.add(top or (-1, -1))
    walk(root, frozenset({top or (-1, -1)}))
    found.sort(key=lambda q: _rel_posix(q, root))
    return found


def _is_dir(entry: os.DirEntry) -> bool:
    """``entry.is_dir()`` following links; False when that fails (a symlink loop raises ELOOP)."""
    try:
        return entry.is_dir()
    except OSError:
        return False


def _dir_key(p: Path) -> tuple[int, int] | None:
    """(device, inode) of the folder ``p`` leads to, following links; None when it cannot be read."""
    try:
        st = p.stat()
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _rel_posix(p: Path, root: Path) -> str:
    try:
        return p.relative_to(root).as_posix()
    except ValueError:
        return p.as_posix()


def _resolved(p: Path) -> Path:
    """``p.resolve()``, or its absolute form when it cannot be resolved (a symlink loop)."""
    try:
        return p.resolve()
    except (OSError, RuntimeError):
        return p.absolute()


def relative_id(path: str | Path, root: str | Path) -> str:
    """Posix path of ``path`` relative to ``root`` (the item id), printable (see ``names.printable``)."""
    path, root = Path(path), Path(root)
    try:
        return printable(path.relative_to(root).as_posix())
    except ValueError:
        pass
    try:
        return printable(_resolved(path).relative_to(_resolved(root)).as_posix())
    except ValueError:
        raise ValueError(printable(f"{path} is not inside {root}")) from None


@dataclass
class MVTecItem:
    """One test image of an MVTec-style dataset."""

    path: Path
    id: str  # relative to the dataset root, e.g. 'test/crack/000.png'
    label: int  # 0 good, 1 anomalous
    defect_type: str  # 'good' or the defect folder name
    mask_path: Path | None = None


@dataclass
class MVTecLayout:
    """``root/train/good``, ``root/test/<type>`` and ``root/ground_truth/<type>/<stem>_mask.*``."""

    root: Path
    train: list[Path]
    test: list[MVTecItem]
    defect_types: list[str]
    missing_masks: list[str] = field(default_factory=list)  # ids of defect images without a mask


def is_mvtec_root(root: str | Path) -> bool:
    """True when ``root/train/good`` is a folder."""
    return (Path(root) / "train" / "good").is_dir()


def normal_images(data: str | Path) -> tuple[Path, list[Path]]:
    """(folder, images) of normal training data: ``train/good`` of an MVTec root, else every image under
    ``data``. Raises FileNotFoundError when ``data`` is not a folder, ValueError when it holds no image."""
    root = Path(data)
    if not root.is_dir():
        raise FileNotFoundError(f"training data folder not found: {root}")
    if is_mvtec_root(root):
        root = root / "train" / "good"
    paths = find_images(root)
    if not paths:
        raise ValueError(f"no images found under {root}")
    return root, paths


def scan_mvtec(root: str | Path) -> MVTecLayout:
    """Index an MVTec-style dataset; defect images without a mask get ``mask_path=None`` and are listed."""
    root = Path(root)
    for sub in (root / "train" / "good", root / "test"):
        if not sub.is_dir():
            raise ValueError(f"{root}: not an MVTec-style dataset, missing folder {sub}")
    train = find_images(root / "train" / "good")
    test: list[MVTecItem] = []
    defect_types: list[str] = []
    missing: list[str] = []
    for type_dir in sorted(d for d in (root / "test").iterdir() if d.is_dir() and not d.name.startswith(".")):
        kind = type_dir.name
        good = kind == "good"
        masks: dict[str, Path] = {}
        if not good:
            defect_types.append(kind)
            gt = root / "ground_truth" / kind
            for m in find_images(gt) if gt.is_dir() else []:
                key = _strip_ext(relative_id(m, gt))
                if key.endswith("_mask"):
                    masks.setdefault(key[: -len("_mask")], m)
        for p in find_images(type_dir):
            item_id = relative_id(p, root)
            mask = None if good else masks.get(_strip_ext(relative_id(p, type_dir)))
            if not good and mask is None:
                missing.append(item_id)
            test.append(MVTecItem(p, item_id, 0 if good else 1, kind, mask))
    return MVTecLayout(root, train, test, defect_types, missing)


def train_val_split(paths: Sequence[T], val_fraction: float, seed: int) -> tuple[list[T], list[T]]:
    """Deterministic split by a ``default_rng(seed)`` permutation; both lists keep the input order.

    At least one validation item when ``val_fraction > 0`` and there are >= 2 items; never an empty train set.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    n = len(paths)
    n_val = int(n * val_fraction + 0.5)
    if val_fraction > 0 and n >= 2:
        n_val = min(max(n_val, 1), n - 1)
    else:
        n_val = 0
    val_idx = set(np.random.default_rng(seed).permutation(n)[:n_val].tolist())
    train = [p for i, p in enumerate(paths) if i not in val_idx]
    val = [p for i, p in enumerate(paths) if i in val_idx]
    return train, val


def _read_list(list_file: Path) -> list[tuple[Path, str]]:
    """(path, id) per non-empty, non-comment line; relative paths resolve against the list's folder.

    Lines are file-name bytes: what is not UTF-8 still names the file (``surrogateescape``)."""
    out = []
    for line in list_file.read_text(encoding="utf-8-sig", errors="surrogateescape").splitlines():
        text = line.strip()
        if text and not text.startswith("#"):
            p = Path(text)
            out.append((p if p.is_absolute() else list_file.parent / p, printable(text)))
    return out


def expand_inputs(inputs: Sequence[str | Path], *, recursive: bool = True) -> list[tuple[Path, str]]:
    """Turn CLI inputs (folders, files, ``.txt``/``.lst`` lists) into ``(path, id)`` pairs in input order.

    Folder images get ids relative to the folder, prefixed by the folder name when several inputs are given;
    a file's id is its name; a listed file's id is the line as written. Explicit files are kept whatever their
    extension, and so are dangling symlinks and symlink loops (the reader reports the problem). Duplicates
    (same resolved path) are dropped; ids that would still collide get a ``~2``, ``~3`` ... suffix. Paths
    that do not exist at all raise ``FileNotFoundError`` naming all of them. Ids are printable text.
    """
    multi = len(inputs) > 1
    pairs: list[tuple[Path, str]] = []
    missing: list[str] = []

    def add_folder(folder: Path, prefix: str) -> None:
        for p in find_images(folder, recursive=recursive):
            rel = relative_id(p, folder)
            if rel == ".":  # the folder itself cannot be listed: one item names it
                pairs.append((p, prefix or printable(_resolved(folder).name or "root")))
            else:
                pairs.append((p, f"{prefix}/{rel}" if prefix else rel))

    for item in inputs:
        p = Path(item)
        if p.is_dir():
            add_folder(p, printable(_resolved(p).name or "root") if multi else "")
        elif p.is_file() and p.suffix.lower() in LIST_SUFFIXES:
            for q, text in _read_list(p):
                if q.is_dir():
                    add_folder(q, text.rstrip("/"))
                elif os.path.lexists(q):
                    pairs.append((q, text))
                else:
                    missing.append(f"{q} (listed in {p})")
        elif os.path.lexists(p):
            pairs.append((p, printable(p.name)))
        else:
            missing.append(str(p))
    if missing:
        raise FileNotFoundError(printable(f"input(s) not found: {', '.join(missing)}"))

    out: list[tuple[Path, str]] = []
    seen_paths: set[Path] = set()
    used: set[str] = set()
    for p, item_id in pairs:
        key = _resolved(p)
        if key in seen_paths:
            continue
        seen_paths.add(key)
        unique, n = item_id, 1
        while unique in used:
            n += 1
            unique = f"{item_id}~{n}"
        used.add(unique)
        out.append((p, unique))
    return out
