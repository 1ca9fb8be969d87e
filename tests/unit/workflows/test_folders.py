"""``workflows.folders``: the watcher's file helpers on real files (no model needed)."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import pytest

from imganom.workflows.folders import (
    WatchError,
    content_hash,
    file_sig,
    lock_folder,
    move_no_clobber,
    openable,
    split_ext,
    unique_path,
    unlock_folder,
)


def test_split_ext_keeps_double_extensions() -> None:
    assert split_ext("scan.nii.gz") == ("scan", ".nii.gz")
    assert split_ext("a.b.PNG") == ("a.b", ".PNG")
    assert split_ext("notes.txt") == ("notes", ".txt") and split_ext(".png") == (".png", "")


def test_unique_path_respects_sidecars(tmp_path: Path) -> None:
    (tmp_path / "a.png.error.txt").write_text("earlier failure")
    assert unique_path(tmp_path / "a.png") == tmp_path / "a.png"
    assert unique_path(tmp_path / "a.png", sidecar=".error.txt") == tmp_path / "a~2.png"


def test_move_no_clobber_never_replaces(tmp_path: Path) -> None:
    src, dst = tmp_path / "in" / "a.png", tmp_path / "done" / "sub" / "a.png"
    src.parent.mkdir()
    src.write_bytes(b"new")
    move_no_clobber(src, dst)  # parents created
    assert dst.read_bytes() == b"new" and not src.exists()
    src.write_bytes(b"newer")
    with pytest.raises(FileExistsError):
        move_no_clobber(src, dst)
    assert dst.read_bytes() == b"new" and src.read_bytes() == b"newer"


def test_file_sig_content_hash_and_openable(tmp_path: Path) -> None:
    f = tmp_path / "a.png"
    f.write_bytes(b"12345")
    os.utime(f, ns=(1_000_000_000, 2_000_000_000))
    sig = file_sig(f)
    assert sig is not None and (sig.size, sig.mtime_ns) == (5, 2_000_000_000)
    assert content_hash(f) == hashlib.sha256(b"12345").hexdigest()
    time.sleep(0.01)
    f.write_bytes(b"54321")  # same size, mtime put back as `cp -p` does: ctime still tells
    os.utime(f, ns=(1_000_000_000, 2_000_000_000))
    assert file_sig(f) != sig and content_hash(f) != hashlib.sha256(b"12345").hexdigest()
    assert file_sig(tmp_path) is None and file_sig(tmp_path / "gone.png") is None  # a folder; missing
    assert openable(f) and not openable(tmp_path / "gone.png")


def test_one_lock_per_folder(tmp_path: Path) -> None:
    fh = lock_folder(tmp_path / ".watch.lock")
    try:
        with pytest.raises(WatchError, match="in use"):
            lock_folder(tmp_path / ".watch.lock")
    finally:
        unlock_folder(fh)
    unlock_folder(lock_folder(tmp_path / ".watch.lock"))  # free again once released
