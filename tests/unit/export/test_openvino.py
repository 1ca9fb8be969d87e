"""OpenVINO IR export (``imganom export --format openvino [--int8]``) and the openvino backend reading it.

Tolerances: an fp32 IR gives the ONNX export's results (maps within PARITY_RTOL of their max, scores within
1e-4, verdicts identical). INT8 (NNCF, calibrated on the synthetic training normals, the head kept fp32):
verdicts identical to fp32 on the synthetic test set and image scores within INT8_SCORE_RTOL; on real data
the loss is measured, not tested (magnetic_tile, docs/BENCHMARKS.md).
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from imganom.cli.main import app
from imganom.export.onnx import PARITY_RTOL, export_onnx, read_onnx_meta
from imganom.formats.modelfile import ModelFileError
from imganom.formats.openvinoir import read_ir_meta, read_ir_model
from imganom.inference import load_inspector
from imganom.inference.backends import OpenVinoBackend

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("openvino") is None or importlib.util.find_spec("nncf") is None,
    reason="needs the [openvino] extra (openvino, nncf)",
)
INT8_SCORE_RTOL = 1e-2  # measured on the synthetic test set (tiny model, 64 px): median 3e-5, max 2.2e-4


@pytest.fixture(scope="module")
def irs(small_run: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The shared tiny model as .onnx, fp32 IR (CLI, --check) and INT8 IR (CLI, calibrated on the model's
    training data by default)."""
    root = tmp_path_factory.mktemp("ov_export")
    out = {"onnx": root / "m.onnx", "fp32": root / "fp32.xml", "int8": root / "int8.xml"}
    export_onnx(small_run["model"], out["onnx"], threads=1)
    for name, extra in (("fp32", []), ("int8", ["--int8", "--calib-size", "48"])):
        args = ["export", "-m", str(small_run["model"]), "--format", "openvino", "-o", str(out[name])]
        r = CliRunner().invoke(app, [*args, "--check", *extra])
        assert r.exit_code == 0, r.output
        assert r.stdout.strip().splitlines()[-1] == str(out[name])
        assert out[name].with_suffix(".bin").is_file()
    return out


def test_ir_carries_the_onnx_metadata(irs: dict[str, Path]) -> None:
    want = read_onnx_meta(irs["onnx"])
    for name in ("fp32", "int8"):
        got = read_ir_meta(irs[name])
        assert {k: got[k] for k in got if k != "export"} == {k: want[k] for k in want if k != "export"}
        assert got["export"]["format"] == "openvino-ir"
        assert got["export"]["scales"] == want["export"]["scales"]
    q = read_ir_meta(irs["int8"])["export"]["int8"]
    assert q["scope"] == "vae" and q["calibration"]["views"] == 40 and q["calibration"]["skipped"] == 0
    assert q["check"]["threshold_flips"] is not None
    assert "int8" not in read_ir_meta(irs["fp32"])["export"]


def test_int8_ir_quantises_the_vae_and_keeps_the_head_fp32(irs: dict[str, Path]) -> None:
    def quantised(path: Path) -> set[str]:
        m = read_ir_model(path)
        return {o.get_friendly_name() for o in m.get_ops() if o.get_type_name() == "FakeQuantize"}

    assert not quantised(irs["fp32"])
    names = quantised(irs["int8"])
    assert names and not any("/head/" in n for n in names)
    assert irs["int8"].with_suffix(".bin").stat().st_size < irs["fp32"].with_suffix(".bin").stat().st_size


def test_fp32_ir_gives_the_onnx_results(irs: dict[str, Path], small_run: dict[str, Path]) -> None:
    paths = sorted((small_run["data"] / "test").glob("*/*.png"))
    ref = load_inspector(irs["onnx"], device="cpu", threads=1).predict(paths)
    ir = load_inspector(irs["fp32"], threads=1)  # .xml: the openvino backend by default
    assert isinstance(ir.backend, OpenVinoBackend) and ir.calibrated and "weights" not in ir.backend_info
    got = ir.predict(paths)
    assert {r.verdict for r in ref} == {"OK", "NG"}
    for a, b in zip(got, ref):
        scale = float(np.abs(b.anomaly_map).max())
        assert float(np.abs(a.anomaly_map - b.anomaly_map).max()) <= PARITY_RTOL * scale
        assert a.score == pytest.approx(b.score, rel=1e-4) and a.verdict == b.verdict


def test_int8_ir_keeps_the_verdicts(irs: dict[str, Path], small_run: dict[str, Path]) -> None:
    paths = sorted((small_run["data"] / "test").glob("*/*.png"))
    ref = load_inspector(irs["fp32"], threads=1).predict(paths)
    got = load_inspector(irs["int8"], threads=1).predict(paths)
    rel = [abs(a.score - b.score) / abs(b.score) for a, b in zip(got, ref)]
    assert [a.verdict for a in got] == [b.verdict for b in ref]
    assert max(rel) <= INT8_SCORE_RTOL, rel
    assert 0 < float(np.median(rel))  # really quantised: not the fp32 graph


def test_inspect_cli_runs_an_int8_ir(irs: dict[str, Path], small_run: dict, tmp_path: Path) -> None:
    test = small_run["data"] / "test"
    args = ["--input", str(test), "-m", str(irs["int8"]), "-o", str(tmp_path), "--workers", "0"]
    r = CliRunner().invoke(app, ["inspect", *args, "--threads", "1", "--no-report"])
    assert r.exit_code == 0, r.output
    summary = json.loads((tmp_path / "summary.json").read_text())
    backend = summary["model"]["backend"]
    assert backend["name"] == "openvino" and backend["weights"] == "int8"
    assert summary["counts"]["total"] == len(list(test.glob("*/*.png"))) and summary["counts"]["error"] == 0


def test_calibration_folder_with_a_bad_image(small_run: dict[str, Path], tmp_path: Path) -> None:
    calib = tmp_path / "normals"
    calib.mkdir()
    for p in sorted((small_run["data"] / "train" / "good").glob("*.png"))[:6]:
        shutil.copy(p, calib / p.name)
    (calib / "broken.png").write_bytes(b"not a png")
    from imganom.export.openvino import export_openvino

    rep = export_openvino(small_run["model"], tmp_path / "q.xml", int8=True, calib=calib)
    q = read_ir_meta(rep.path)["export"]["int8"]["calibration"]
    assert q == {"folder": str(calib), "images": 7, "views": 6, "skipped": 1}
    assert any("broken.png" in n for n in rep.notes)


def test_usage_errors(small_run: dict[str, Path], irs: dict[str, Path], tmp_path: Path) -> None:
    runner = CliRunner()
    base = ["export", "-m", str(small_run["model"])]
    r = runner.invoke(app, [*base, "--format", "onnx", "-o", str(tmp_path / "m.onnx"), "--int8"])
    assert r.exit_code == 2 and "--format openvino" in r.output
    (tmp_path / "empty").mkdir()
    r = runner.invoke(app, [*base, "--format", "openvino", "-o", str(tmp_path / "q.xml"), "--int8", "--calib",
                            str(tmp_path / "empty")])  # fmt: skip
    assert r.exit_code == 1 and "no images found" in r.output and not (tmp_path / "q.xml").exists()
    r = runner.invoke(app, [*base, "--format", "openvino", "-o", str(tmp_path / "q.onnx")])
    assert r.exit_code == 1 and ".xml" in r.output
    with pytest.raises(ValueError, match="openvino backend"):
        load_inspector(irs["int8"], backend="onnxruntime")
    lone = tmp_path / "lone.xml"
    shutil.copy(irs["fp32"], lone)
    with pytest.raises(ModelFileError, match="lone.bin"):
        load_inspector(lone)
    with pytest.raises(ValueError, match="scope"):
        from imganom.export.openvino import quantize_int8

        quantize_int8(read_ir_model(irs["fp32"]), [], scope="head")
