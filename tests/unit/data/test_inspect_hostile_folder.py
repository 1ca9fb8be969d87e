"""End to end through ``imganom inspect``: a folder of hostile inputs built here gives exactly one row per
input, the good image a verdict and every hostile one an error row naming its cause (nothing lost, no
crash, no verdict for what cannot be inspected)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
from helpers import PACKAGE, cli_env, imganom_cmd
from image_files import nifti_header, png_zeros, write_dicom
from PIL import Image

EXPECTED = {
    "good.png": None,
    "dot.png": "image too small: 1x1",
    "claim.nii": "header claims 1000000000000 slices, more than the limit of 10000 per file",
    "frames.dcm": "header claims 1000000000000 frames, more than the limit of 10000 per file",
    "bomb.png": "13000x13000 x 1 channel(s) x 1 byte(s) = 169000000 bytes > max_bytes=134217728",
    "dangling.png": "dangling symlink: its target 'missing.png' does not exist",
    "self.png": "symlink loop: too many levels of symbolic links",
    "sub/up": "symlink loop: this folder link points to",
}


def test_inspect_gives_one_row_per_hostile_input(tmp_path: Path) -> None:
    d = tmp_path / "in"
    d.mkdir()
    Image.fromarray((np.random.default_rng(0).random((64, 64)) * 255).astype(np.uint8)).save(d / "good.png")
    (d / "dot.png").write_bytes(png_zeros(1, 1))
    (d / "claim.nii").write_bytes(nifti_header((8, 8, 10**12)))  # 544 bytes, NIfTI-2
    write_dicom(d / "frames.dcm", np.zeros((8, 8), np.uint16), frames="1000000000000")
    (d / "bomb.png").write_bytes(png_zeros(13000, 13000))  # 164 KB
    os.symlink("missing.png", d / "dangling.png")
    os.symlink("self.png", d / "self.png")
    (d / "sub").mkdir()
    os.symlink("..", d / "sub" / "up")
    model = PACKAGE / "assets" / "demo.safetensors"
    cmd = imganom_cmd("inspect", "--model", str(model), "--input", str(d), "--out", str(tmp_path / "out"))
    r = subprocess.run(cmd, capture_output=True, text=True, env=cli_env(), timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    rows = [json.loads(line) for line in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
    assert sorted(row["id"] for row in rows) == sorted(EXPECTED)
    for row in rows:
        words = EXPECTED[row["id"]]
        if words is None:
            assert row["status"] == "ok" and row["verdict"] in ("OK", "NG")
        else:
            assert row["status"] == "error" and row["verdict"] is None and words in row["error"], row
