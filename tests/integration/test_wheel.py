"""A non-editable install works: the wheel carries the presets, templates and demo weights, and the
installed ``imganom`` runs the demo and finds a preset from a directory outside the source checkout."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
from helpers import ROOT, cli_env


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    p = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out),
         str(ROOT)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr
    (whl,) = out.glob("imganom-*.whl")
    return whl


def test_wheel_contents(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    presets = {Path(n).stem for n in names if n.startswith("imganom/config/presets/") and n.endswith(".yaml")}
    assert {"default", "industrial-gray", "industrial-rgb", "medical-mri", "tiny"} <= presets
    assert "imganom/assets/demo.safetensors" in names
    templates = "imganom/reporting/templates/"
    assert {templates + "report.html.j2", templates + "evaluate.html.j2"} <= names
    assert not any(n.startswith(("tests/", "tools/")) for n in names)
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    assert "imganom = imganom.cli.main:app" in zipfile.ZipFile(wheel).read(entry).decode()


def test_installed_wheel_runs_from_any_directory(wheel: Path, tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    site = Path(subprocess.check_output(
        [str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        text=True,
    ).strip())  # fmt: skip
    # dependencies come from this interpreter's site-packages (appended, so the wheel's imganom wins)
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    p = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "--no-deps", "-q",
         str(wheel)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {k: v for k, v in cli_env().items() if k != "PYTHONPATH"}
    py = str(venv / "bin" / "python")
    where = subprocess.run(
        [py, "-c", "import imganom, imganom.config as c; print(imganom.__file__);"
         "print(c.load_config('industrial-gray').preprocess.intensity.mode)"],
        cwd=work, capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    assert where.returncode == 0, where.stderr
    installed, mode = where.stdout.split()
    assert Path(installed).is_relative_to(venv) and not Path(installed).is_relative_to(ROOT)
    assert mode == "percentile"
    demo = subprocess.run(
        [str(venv / "bin" / "imganom"), "demo", "--out", "demo", "--no-train"],
        cwd=work, capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    assert demo.returncode == 0, demo.stderr
    summary = json.loads((work / "demo" / "results" / "summary.json").read_text())
    assert summary["counts"]["total"] == 45 and summary["counts"]["error"] == 0
    assert os.path.isfile(work / "demo" / "results" / "report.html")
