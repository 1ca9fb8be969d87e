"""Files and folders as the watcher needs them: which names to pick up, when a file is stable (its signature)
and what it holds (its content hash), moves that never replace a file, unique names (``a~2.png``), durable
folder entries and a one-process lock."""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import stat
from pathlib import Path
from typing import Any, NamedTuple

from imganom.data.readers import IMAGE_EXTENSIONS

TEMP_SUFFIXES = (".tmp", ".part", ".partial", ".crdownload", ".filepart", ".download", ".swp", "~")


class WatchError(RuntimeError):
    """The watcher cannot start (bad folders, OUT in use by another watcher)."""


def is_candidate(name: str) -> bool:
    """True for names the watcher inspects: visible, not a temp/partial name, an image extension."""
    low = name.lower()
    return not name.startswith(".") and not low.endswith(TEMP_SUFFIXES) and low.endswith(IMAGE_EXTENSIONS)


def split_ext(name: str) -> tuple[str, str]:
    """``a.nii.gz`` -> (``a``, ``.nii.gz``); ``a.png`` -> (``a``, ``.png``)."""
    low = name.lower()
    for ext in sorted(IMAGE_EXTENSIONS, key=len, reverse=True):
        if low.endswith(ext) and len(name) > len(ext):
            return name[: -len(ext)], name[-len(ext) :]
    stem, ext = os.path.splitext(name)
    return stem, ext


def unique_path(path: Path, sidecar: str = "") -> Path:
    """``path`` if neither it nor ``path + sidecar`` exists, else ``stem~2.ext``, ``stem~3.ext``..."""
    stem, ext = split_ext(path.name)
    cand, n = path, 1
    while cand.exists() or (sidecar and cand.with_name(cand.name + sidecar).exists()):
        n += 1
        cand = path.with_name(f"{stem}~{n}{ext}")
    return cand


def move_no_clobber(src: Path, dst: Path) -> None:
    """Move ``src`` to ``dst`` (parents created) without replacing anything; across filesystems via a fsynced
    temp copy renamed into place, then the source is removed. Raises FileExistsError if ``dst`` exists."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.exists():
        raise FileExistsError(errno.EEXIST, "destination exists", str(dst))
    try:
        os.rename(src, dst)
        return
    except OSError as e:
        if e.errno != errno.EXDEV:
            raise
    tmp = dst.with_name(f".{dst.name}.moving.tmp")
    shutil.copy2(src, tmp)
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    if dst.exists():
        tmp.unlink()
        raise FileExistsError(errno.EEXIST, "destination exists", str(dst))
    os.rename(tmp, dst)
    src.unlink()


class FileSig(NamedTuple):
    """What changes whenever a file's content may have changed: ``ctime`` and the inode move even when a
    writer restores size and mtime (``cp -p``, ``rsync -t``, a rename over the file)."""

    size: int
    mtime_ns: int
    ctime_ns: int
    inode: int


def file_sig(path: Path) -> FileSig | None:
    """The ``FileSig`` of a regular file, None if it is gone or not a regular file."""
    try:
        st = path.stat()
    except OSError:
        return None
    if not stat.S_ISREG(st.st_mode):
        return None
    return FileSig(st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)


def content_hash(path: Path, chunk: int = 1 << 20) -> str:
    """SHA-256 (hex) of a file's bytes, read in chunks; raises OSError if it cannot be read."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def openable(path: Path) -> bool:
    """True if ``path`` can be opened and read (a writer holding it exclusively makes it False)."""
    try:
        with open(path, "rb") as fh:
            fh.read(1)
        return True
    except OSError:
        return False


def fsync_dir(path: Path) -> None:
    """Make a folder's entries (creations, renames) durable; best effort."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def lock_folder(path: Path) -> Any:
    """An exclusive advisory lock (POSIX ``flock``; released by the OS if the process dies)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: no lock
        return None
    fh = open(path, "a+")
    try:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        fh.close()
        raise WatchError(f"{path.parent} is in use by another imganom watch") from None
    return fh


def unlock_folder(fh: Any) -> None:
    """Release ``lock_folder``'s lock."""
    if fh is not None:
        fh.close()
