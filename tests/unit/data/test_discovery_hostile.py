"""Discovery of hostile folder trees, built here: names that are not UTF-8, dangling symlinks, symlink loops,
special files and unreadable entries are listed (never dropped) and the reader names each cause."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imganom.data.discovery import expand_inputs, find_images, relative_id
from imganom.data.names import printable
from imganom.data.readers import ImageReadError, read_image

BAD = os.fsdecode(b"bad\xff\xfe.png")  # what os.listdir gives for these bytes (lone surrogates)
BAD_DIR = os.fsdecode(b"d\xe9j\xe0")


def png(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8)).save(path)
    return path


def reason(path: Path) -> str:
    with pytest.raises(ImageReadError) as ei:
        read_image(path)
    str(ei.value).encode("utf-8")  # always printable
    return ei.value.reason


def test_printable():
    assert printable("ok/ü.png") == "ok/ü.png"
    assert printable(BAD) == "bad\\xff\\xfe.png"
    assert printable("x\ud800") == "x\\ud800"  # a surrogate no file-name decoding produced


def test_non_utf8_names_are_listed_with_printable_ids(tmp_path):
    root = tmp_path / "in"
    for rel in ("good.png", BAD, f"{BAD_DIR}/img.png"):
        png(root / rel)
    (root / os.fsdecode(b"broken\xff.png")).write_bytes(b"not a png")
    found = expand_inputs([root])
    ids = ["bad\\xff\\xfe.png", "broken\\xff.png", "d\\xe9j\\xe0/img.png", "good.png"]
    assert [i for _, i in found] == ids
    for p, item_id in found:
        json.dumps({"id": item_id}, ensure_ascii=False).encode("utf-8")
        if "broken" not in item_id:
            assert read_image(p)[0].shape == (1, 8, 8)  # the path still opens the file
    assert reason(root / os.fsdecode(b"broken\xff.png")).startswith("not a PNG image")
    with pytest.raises(ImageReadError) as ei:
        read_image(root / os.fsdecode(b"broken\xff.png"))
    assert "broken\\xff.png: not a PNG" in str(ei.value)
    # a list file naming it in the same bytes, and the file given directly
    (tmp_path / "l.txt").write_bytes(b"in/bad\xff\xfe.png\n")
    assert [i for _, i in expand_inputs([tmp_path / "l.txt"])] == ["in/bad\\xff\\xfe.png"]
    assert expand_inputs([root / BAD]) == [(root / BAD, "bad\\xff\\xfe.png")]
    assert relative_id(root / BAD_DIR / "img.png", root) == "d\\xe9j\\xe0/img.png"


@pytest.mark.timeout(60)
def test_symlink_problems_are_listed_and_named(tmp_path):
    root = tmp_path / "in"
    png(root / "good.png")
    png(tmp_path / "other" / "img.png")
    os.symlink("missing.png", root / "dangling.png")
    os.symlink("loop2.png", root / "loop1.png")
    os.symlink("loop1.png", root / "loop2.png")
    os.symlink("self.png", root / "self.png")
    (root / "sub").mkdir()
    os.symlink("..", root / "sub" / "up")  # a folder link back into its own ancestor
    os.symlink("../other", root / "linked")  # a real folder elsewhere: followed
    os.symlink("../other", root / "twice")  # the same folder again: walked once
    os.symlink("nowhere", root / "dangling_dir")  # no image extension: not an image by name
    os.mkfifo(root / "pipe.png")
    found = find_images(root)
    assert [relative_id(p, root) for p in found] == [
        "dangling.png", "good.png", "linked/img.png", "loop1.png", "loop2.png", "pipe.png", "self.png",
        "sub/up",
    ]
    assert reason(root / "dangling.png") == "dangling symlink: its target 'missing.png' does not exist"
    for name in ("loop1.png", "loop2.png", "self.png"):
        assert reason(root / name) == "symlink loop: too many levels of symbolic links"
    assert reason(root / "sub" / "up").startswith("symlink loop: this folder link points to")
    assert reason(root / "pipe.png") == "not a regular file"  # never opened, so never blocks
    assert read_image(root / "linked" / "img.png")[0].shape == (1, 8, 8)
    # explicit inputs that are broken links are kept too (an error row, not "input not found")
    out = expand_inputs([root / "self.png", root / "dangling.png"])
    assert [i for _, i in out] == ["self.png", "dangling.png"]
    with pytest.raises(FileNotFoundError, match="nope.png"):
        expand_inputs([root / "nope.png"])


_UNREADABLE = textwrap.dedent("""
    import json, sys
    from imganom.data.discovery import expand_inputs
    from imganom.data.readers import ImageReadError, read_image
    out = {}
    for root in sys.argv[1:]:
        for path, item_id in expand_inputs([root]):
            try:
                read_image(path)
                out[item_id] = "ok"
            except ImageReadError as e:
                out[item_id] = e.reason
    print(json.dumps(out))
""")


def _unprivileged() -> list[str]:
    """The command prefix that makes permission bits bind (root: drop the capabilities that bypass them)."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("running as root without setpriv: permission bits cannot be made to bind")
    return [setpriv, "--bounding-set=-dac_override,-dac_read_search"]


def test_unreadable_folders_and_files_are_items_with_the_cause(tmp_path):
    root, closed = tmp_path / "in", tmp_path / "closed"
    png(root / "ok.png")
    png(root / "locked" / "inner.png")
    png(root / "secret.png")
    png(closed / "x.png")
    for p, mode in ((root / "locked", 0o000), (root / "secret.png", 0o000), (closed, 0o000)):
        p.chmod(mode)
    try:
        r = subprocess.run([*_unprivileged(), sys.executable, "-c", _UNREADABLE, str(root), str(closed)],
                           capture_output=True, text=True, timeout=120)  # fmt: skip
    finally:
        for p in (root / "locked", root / "secret.png", closed):
            p.chmod(0o755)
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout)
    assert out == {
        "locked": "folder cannot be read (Permission denied): the images in it were not inspected",
        "ok.png": "ok",
        "secret.png": "cannot open file: Permission denied",
        "closed": "folder cannot be read (Permission denied): the images in it were not inspected",
    }
