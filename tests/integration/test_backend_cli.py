"""``--backend`` / ``--threads`` on the commands (in-process CLI): every backend gives the rows torch gives,
and ``summary.json`` says which backend ran and, with ``--backend auto``, what was measured."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from imganom.cli.main import app

pytestmark = pytest.mark.timeout(300)
BACKENDS = ["onnxruntime"] + (["openvino"] if importlib.util.find_spec("openvino") else [])


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IMGANOM_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "imganom-cache"))


def _inspect(small_run: dict, out: Path, *extra: str) -> tuple[dict[str, dict], dict]:
    args = ["inspect", "--model", str(small_run["model"]), "--input", str(small_run["data"] / "test"),
            "--out", str(out), "--workers", "0", "--no-report", "--device", "cpu", *extra]  # fmt: skip
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    return {row["id"]: row for row in rows}, json.loads((out / "summary.json").read_text())


def test_inspect_on_every_backend_gives_the_torch_rows(small_run: dict, tmp_path: Path) -> None:
    ref, summary = _inspect(small_run, tmp_path / "torch")
    assert summary["model"]["backend"]["name"] == "torch" and "auto" not in summary["model"]["backend"]
    assert {row["verdict"] for row in ref.values()} == {"OK", "NG"}
    for backend in BACKENDS:
        rows, summary = _inspect(small_run, tmp_path / backend, "--backend", backend, "--threads", "1")
        info = summary["model"]["backend"]
        assert info["name"] == backend and info["threads"] == 1 and info["precision"] == "fp32"
        assert rows.keys() == ref.keys()
        for k, row in rows.items():
            assert row["verdict"] == ref[k]["verdict"] and row["n_regions"] == ref[k]["n_regions"], k
            assert row["score"] == pytest.approx(ref[k]["score"], rel=1e-4, abs=1e-7), k
            assert row["outputs"].keys() == ref[k]["outputs"].keys(), k


def test_inspect_backend_auto_reports_its_choice(small_run: dict, tmp_path: Path) -> None:
    _, summary = _inspect(small_run, tmp_path / "auto", "--backend", "auto", "--threads", "1")
    info = summary["model"]["backend"]
    auto = info["auto"]
    assert auto["candidates"][:2] == ["torch", "onnxruntime"] and info["name"] in auto["candidates"]
    assert set(auto["img_s"]) == set(auto["candidates"]) and auto["batch"] >= 1
    assert info["name"] == max(auto["img_s"], key=auto["img_s"].get)
    _, again = _inspect(small_run, tmp_path / "auto2", "--backend", "auto", "--threads", "1")
    assert again["model"]["backend"]["auto"]["cached"] is True
    assert again["model"]["backend"]["name"] == info["name"]


def test_bad_backend_is_a_usage_error(small_run: dict, tmp_path: Path) -> None:
    model, data = str(small_run["model"]), small_run["data"]
    args = ["inspect", "--model", model, "--input", str(data / "test"), "--out", str(tmp_path),
            "--backend", "tensorrt"]  # fmt: skip
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 2 and "--backend" in r.output
    args = ["evaluate", "--model", model, "--data", str(data), "--out", str(tmp_path / "e"),
            "--backend", "onnxruntime", "--precision", "bf16"]  # fmt: skip
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 2 and "fp32" in r.output


def test_evaluate_records_the_backend(small_run: dict, tmp_path: Path) -> None:
    out = tmp_path / "eval"
    args = ["evaluate", "--model", str(small_run["model"]), "--data", str(small_run["data"]),
            "--out", str(out), "--workers", "0", "--worst", "0", "--no-report", "--device", "cpu",
            "--backend", "onnxruntime"]  # fmt: skip
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    blob = json.dumps([json.loads(p.read_text()) for p in out.glob("*.json")])
    assert '"name": "onnxruntime"' in blob
