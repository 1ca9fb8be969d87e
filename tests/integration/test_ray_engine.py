"""``imganom inspect --engine ray`` on a real local Ray cluster (started once for this module): the same rows,
scores, masks and verdicts as ``--engine local``; an actor that dies mid-run loses and duplicates nothing;
``--resume`` across engines; the CLI joining the cluster by its address."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import nibabel as nib
import numpy as np
import pytest
from helpers import cli_env

from imganom.inference.inspector import Inspector
from imganom.workflows.inspect import run_inspect

ray = pytest.importorskip("ray")
ray_engine = pytest.importorskip("imganom.workflows.ray_engine")

COMPARE = ("id", "path", "status", "verdict", "n_regions", "max_region_area", "model_id", "outputs", "size")
BAD = {"empty.png", "notes.png"}


@pytest.fixture(scope="module")
def cluster() -> str:
    """A local Ray instance on this machine (2 CPUs) for the whole module; yields its address. The signal
    handlers ray.init installs are removed afterwards (later tests check this process's own)."""
    with ray_engine.keep_signal_handlers():
        ctx = ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
        try:
            yield ctx.address_info["gcs_address"]
        finally:
            ray.shutdown()


@pytest.fixture(scope="module")
def folder(synth_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Good images, defects, two unreadable files and a 3-slice NIfTI volume (3 items)."""
    root = tmp_path_factory.mktemp("ray_in") / "in"
    for sub in ("good", "crack", "hole", "spot"):
        for p in sorted((synth_root / "test" / sub).glob("*.png"))[:3]:
            (root / sub).mkdir(parents=True, exist_ok=True)
            shutil.copy(p, root / sub / p.name)
    (root / "empty.png").write_bytes(b"")
    (root / "notes.png").write_text("this is not an image\n")
    good = [cv2.imread(str(p), cv2.IMREAD_GRAYSCALE) for p in sorted(root.glob("good/*.png"))]
    vol = np.stack([g.T for g in good], axis=-1).astype(np.uint8)  # NIfTI (x, y, z)
    nib.save(nib.Nifti1Image(vol, np.eye(4)), str(root / "vol.nii.gz"))
    return root


@pytest.fixture(scope="module")
def insp(tiny_model: Path) -> Inspector:
    return Inspector.load(tiny_model, device="cpu")


@pytest.fixture(scope="module")
def local(insp: Inspector, folder: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict]]:
    out = tmp_path_factory.mktemp("ray_local") / "out"
    rows, _ = run_inspect(insp, [folder], out, batch_size=4, workers=0, report=False)
    return out, rows


def _ray(insp: Inspector, model: Path, folder: Path, out: Path, **kw) -> tuple[list[dict], dict]:
    engine = ray_engine.RayOptions(actors=kw.pop("actors", 2), remote_args=kw.pop("remote_args", {}))
    return ray_engine.run_inspect_ray(
        insp, model, {"device": "cpu"}, [folder], out, engine=engine, batch_size=4, **kw
    )


def _jsonl(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


def _same_rows(rows: list[dict], ref: list[dict], out: Path, ref_out: Path) -> None:
    """Row for row: the same ids in the same order, fields, scores (float tolerance) and mask pixels."""
    assert [r["id"] for r in rows] == [r["id"] for r in ref]
    for r, e in zip(rows, ref):
        assert {k: r.get(k) for k in COMPARE} == {k: e.get(k) for k in COMPARE}, r["id"]
        if e["status"] == "ok":
            assert r["score"] == pytest.approx(e["score"], rel=1e-5, abs=1e-7)
            for rel in e["outputs"].values():
                if rel.endswith(".png") and "masks/" in rel:
                    a = cv2.imread(str(out / rel), cv2.IMREAD_UNCHANGED)
                    b = cv2.imread(str(ref_out / rel), cv2.IMREAD_UNCHANGED)
                    assert np.array_equal(a, b), rel
        else:
            assert r["error"] == e["error"] and r["error"]


def test_ray_engine_matches_local(cluster, insp, tiny_model, folder, local, tmp_path: Path) -> None:
    ref_out, ref = local
    ids = [r["id"] for r in ref]
    assert {"vol.nii.gz#slice=0000", "vol.nii.gz#slice=0002"} <= set(ids) and BAD <= set(ids)
    assert {r["verdict"] for r in ref} >= {"OK", "NG"}  # the comparison covers both verdicts
    out = tmp_path / "out"
    rows, summary = _ray(insp, tiny_model, folder, out)
    _same_rows(rows, ref, out, ref_out)
    _same_rows(_jsonl(out), ref, out, ref_out)  # results.jsonl rewritten in input order
    assert (out / "results.csv").read_text().count("\n") == len(ref) + 1
    assert json.loads((out / "summary.json").read_text())["counts"] == summary["counts"]
    assert summary["counts"]["error"] == 2 and summary["counts"]["total"] == len(ref)
    assert summary["engine"]["name"] == "ray" and summary["engine"]["actors"] == 2
    assert (out / "report.html").is_file()
    import pyarrow.parquet as pq

    table = pq.read_table(out / "results.parquet")
    assert sorted(table.column("id").to_pylist()) == sorted(ids)
    by_id = dict(zip(table.column("id").to_pylist(), table.column("score").to_pylist()))
    assert all(by_id[r["id"]] == r["score"] for r in rows)


def test_actor_crash_loses_and_duplicates_nothing(cluster, insp, tiny_model, folder, local, tmp_path) -> None:
    marker = tmp_path / "crashed"
    env = {"runtime_env": {"env_vars": {ray_engine.CRASH_ONCE_ENV: str(marker)}}}
    out = tmp_path / "out"
    rows, summary = _ray(insp, tiny_model, folder, out, actors=1, remote_args=env)
    assert marker.exists()  # the actor did die after writing its batch's outputs, before returning rows
    ref_out, ref = local
    _same_rows(rows, ref, out, ref_out)
    ids = [r["id"] for r in _jsonl(out)]
    assert len(ids) == len(set(ids)) == len(ref)
    assert summary["counts"]["total"] == len(ref)


def test_resume_across_engines(cluster, insp, tiny_model, folder, local, tmp_path: Path) -> None:
    ref_out, ref = local
    out = tmp_path / "out"
    shutil.copytree(ref_out, out)
    lines = (out / "results.jsonl").read_text().splitlines(keepends=True)
    (out / "results.jsonl").write_text("".join(lines[:5]))  # a local run stopped after 5 rows
    rows, summary = _ray(insp, tiny_model, folder, out, actors=1, resume=True)
    assert summary["counts"]["resumed"] == 5
    _same_rows(rows, ref, out, ref_out)
    lines = (out / "results.jsonl").read_text().splitlines(keepends=True)
    (out / "results.jsonl").write_text("".join(lines[:9]))  # the Ray run's rows, cut: local resumes them
    rows, summary = run_inspect(insp, [folder], out, batch_size=4, workers=0, resume=True, report=False)
    assert summary["counts"]["resumed"] == 9
    _same_rows(rows, ref, out, ref_out)


def test_cli_engine_ray_joins_the_cluster(cluster: str, tiny_model, folder, local, tmp_path: Path) -> None:
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "imganom.cli", "inspect", "--model", str(tiny_model), "-i", str(folder),
           "-o", str(out), "--engine", "ray", "--ray-address", cluster, "--actors", "1", "--batch-size", "4",
           "--device", "cpu", "--no-report"]  # fmt: skip
    p = subprocess.run(cmd, capture_output=True, text=True, env=cli_env(), timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    ref_out, ref = local
    _same_rows(_jsonl(out), ref, out, ref_out)
    assert f"{len(ref)} images:" in p.stderr and "2 errors" in p.stderr
    bad = subprocess.run(cmd[:-1] + ["--engine", "spark"], capture_output=True, text=True, env=cli_env())
    assert bad.returncode == 2 and "--engine must be local or ray" in bad.stderr


def test_keep_signal_handlers_puts_ours_back() -> None:
    import signal

    def ours(*_: object) -> None:
        pass

    before = signal.signal(signal.SIGTERM, ours)
    try:
        with ray_engine.keep_signal_handlers():
            signal.signal(signal.SIGTERM, signal.SIG_IGN)  # as ray.init does with its own handler
        assert signal.getsignal(signal.SIGTERM) is ours
    finally:
        signal.signal(signal.SIGTERM, before)
