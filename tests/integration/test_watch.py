"""``imganom watch``: readiness, outputs, done/error moves, crash recovery (kill -9) and SIGTERM.

The end-to-end test runs the real CLI in subprocesses; the others drive ``FolderWatcher`` in-process on real
folders (cheaper: one torch import).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from typer.testing import CliRunner

from imganom.cli.main import app
from imganom.inference.inspector import Inspector
from imganom.workflows.watch import FolderWatcher, WatchError, WatchOptions, is_candidate, unique_path

ENV = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "OMP_NUM_THREADS": "1"}
IMGANOM = str(Path(sys.executable).with_name("imganom"))
FAST = WatchOptions(poll_s=0.05, settle_s=0.2, retry_s=0.3, batch_size=4, once=True, report=False)


@pytest.fixture(scope="session")
def setup(small_run: dict[str, Path]) -> dict:
    """The shared tiny calibrated model (conftest ``small_run``) plus PNG bytes of its test images."""
    pngs = [p.read_bytes() for p in sorted((small_run["data"] / "test").glob("*/*.png"))]
    return {"model": small_run["model"], "insp": Inspector.load(small_run["model"]), "pngs": pngs}


def _rows(out: Path) -> list[dict]:
    """Complete rows of results.jsonl (a torn last line from a killed writer is ignored)."""
    p = out / "results.jsonl"
    if not p.exists():
        return []
    rows = []
    for line in p.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return rows


def _wait(pred: Callable[[], bool], timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _files(d: Path) -> list[str]:
    return sorted(p.relative_to(d).as_posix() for p in d.rglob("*") if p.is_file()) if d.exists() else []


def _start(model: Path, in_dir: Path, out: Path, log: Path) -> subprocess.Popen:
    args = [IMGANOM, "watch", str(in_dir), "--model", str(model), "--out", str(out), "--poll-s", "0.1",
            "--settle-s", "0.5", "--retry-s", "1", "--batch-size", "4", "--no-report"]  # fmt: skip
    with open(log, "ab") as fh:
        proc = subprocess.Popen(args, stdout=fh, stderr=subprocess.STDOUT, env=ENV)
    n = log.read_text().count("watching")
    _wait(lambda: log.read_text().count("watching") > n or proc.poll() is not None, 90, "watcher start")
    assert proc.poll() is None, log.read_text()
    return proc


def _slow_write(path: Path, data: bytes, chunks: int = 4, pause: float = 0.05) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    step = -(-len(data) // chunks)
    with open(path, "wb") as fh:
        for k in range(0, len(data), step):
            fh.write(data[k : k + step])
            fh.flush()
            time.sleep(pause)


def test_watch_cli_survives_kill_9_and_exits_0_on_sigterm(setup: dict, tmp_path: Path) -> None:
    in_dir, out, log = tmp_path / "in", tmp_path / "out", tmp_path / "watch.log"
    in_dir.mkdir()
    (out / "done").mkdir(parents=True)
    (out / "done" / "clash.png").write_bytes(b"someone else's file")  # must never be replaced
    pngs = setup["pngs"]
    plan: list[tuple[str, str]] = [(f"f{i:02d}.png", "slow" if i % 3 == 0 else "plain") for i in range(10)]
    plan[4] = ("sub/deep/f04.png", "rename")  # written slowly under a .part name, then renamed
    plan[7] = ("bad.png", "corrupt")
    plan[8] = ("clash.png", "rename")
    expected = {rel for rel, _ in plan}

    def drop_files() -> None:
        for i, (rel, how) in enumerate(plan):
            target = in_dir / rel
            if how == "slow":  # pauses shorter than settle-s: never read half-written
                _slow_write(target, pngs[i])
            elif how == "rename":  # pauses longer than settle-s, but under a temp name
                tmp = target.with_name(target.name + ".part")
                _slow_write(tmp, pngs[i], chunks=2, pause=0.7)
                os.rename(tmp, target)
            elif how == "corrupt":
                target.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00garbage" * 50)
            else:
                target.write_bytes(pngs[i])
            time.sleep(0.15)

    proc = _start(setup["model"], in_dir, out, log)
    writer = threading.Thread(target=drop_files)
    writer.start()
    try:
        _wait(lambda: len(_rows(out)) >= 3, 60, "3 rows before the kill")
        proc.send_signal(signal.SIGKILL)  # while files are still arriving
        assert proc.wait(timeout=10) == -signal.SIGKILL
    finally:
        writer.join()
    before = _rows(out)
    assert len(before) < len(plan), "the kill came too late to test anything"
    # the crash window between a durable row and the move: put one processed file back where it came from
    victim = next(r for r in before if r["status"] == "ok")
    os.rename(out / victim["moved_to"], in_dir / victim["source"]["rel"])

    proc = _start(setup["model"], in_dir, out, log)
    try:
        _wait(lambda: not _files(in_dir) and len(_rows(out)) >= len(plan), 60, "all files processed")
        time.sleep(0.3)  # a second row would show up now
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "from an interrupted run" in log.read_text()  # the victim was moved, not inspected again

    rows = _rows(out)
    ids = [r["id"] for r in rows]
    assert sorted(ids) == sorted(expected)  # exactly one row per file
    assert _files(in_dir) == []
    by_id = {r["id"]: r for r in rows}
    assert by_id["bad.png"]["status"] == "error" and "bad.png" in by_id["bad.png"]["error"]
    assert all(by_id[i]["status"] == "ok" for i in expected - {"bad.png"})  # slow writes never read early
    assert _files(out / "error") == ["bad.png", "bad.png.error.txt"]
    assert "bad.png" in (out / "error" / "bad.png.error.txt").read_text()
    done = _files(out / "done")
    assert sorted(done) == sorted([*(expected - {"bad.png"}), "clash~2.png"])
    assert (out / "done" / "clash.png").read_bytes() == b"someone else's file"
    assert by_id["clash.png"]["moved_to"] == "done/clash~2.png"
    for rel, how in plan:  # moved files are byte-identical to what was dropped
        if how != "corrupt":
            assert (out / by_id[rel]["moved_to"]).read_bytes() == pngs[plan.index((rel, how))]
    ng = by_id["sub/deep/f04.png"]["verdict"] == "NG"  # overlays: NG images by default
    for kind, ext in (("masks", "png"), ("heatmaps", "png"), ("overlays", "png"))[: 3 if ng else 2]:
        assert (out / kind / "sub" / "deep" / f"f04_png.{ext}").is_file()
        assert by_id["sub/deep/f04.png"]["outputs"][kind[:-1]] == f"{kind}/sub/deep/f04_png.{ext}"
    csv_lines = (out / "results.csv").read_text().strip().splitlines()
    assert len(csv_lines) == 1 + len(plan)
    assert json.loads((out / "summary.json").read_text())["counts"]["total"] == len(plan)


def test_readiness_and_ignored_names(setup: dict, tmp_path: Path) -> None:
    in_dir, out = tmp_path / "in", tmp_path / "out"
    in_dir.mkdir()
    for name in (".hidden.png", "a.png.tmp", "a.png.part", "a.png.crdownload", "notes.txt"):
        (in_dir / name).write_bytes(setup["pngs"][0])
    assert not any(is_candidate(n) for n in (".x.png", "x.png.part", "x.TMP", "x.txt"))
    assert all(is_candidate(n) for n in ("x.png", "X.PNG", "v.nii.gz", "s.dcm"))
    w = FolderWatcher(setup["insp"], in_dir, out, WatchOptions(settle_s=0.5))
    try:
        data = setup["pngs"][1]
        target = in_dir / "grow.png"
        for k in range(4):  # growing file: never ready while it changes
            with open(target, "ab") as fh:
                fh.write(data[k * len(data) // 4 : (k + 1) * len(data) // 4])
            assert w.poll() == []
            time.sleep(0.1)
        assert w.poll() == []  # unchanged, but not yet for settle-s
        time.sleep(0.55)
        ready = w.poll()
        assert [(r.rel, r.sig.size) for r in ready] == [("grow.png", len(data))]
        w.process(ready)
    finally:
        w.close()
    assert _files(out / "done") == ["grow.png"]
    assert sorted(_files(in_dir)) == sorted([".hidden.png", "a.png.crdownload", "a.png.part", "a.png.tmp",
                                             "notes.txt"])  # fmt: skip
    assert [r["status"] for r in _rows(out)] == ["ok"]


def test_recovery_reuse_of_names_and_done_inside_watched_tree(setup: dict, tmp_path: Path) -> None:
    in_dir, out = tmp_path / "in", tmp_path / "out"
    opts = WatchOptions(**{**vars(FAST), "done": in_dir / "done"})  # inside the watched tree: never scanned
    (in_dir / "sub").mkdir(parents=True)
    (in_dir / "sub" / "a.png").write_bytes(setup["pngs"][2])
    (in_dir / "bad.png").write_bytes(b"not an image")
    st = FolderWatcher(setup["insp"], in_dir, out, opts).run()
    assert (st.files, st.rows, st.error, st.recovered) == (2, 2, 1, 0)
    assert _files(in_dir) == ["done/sub/a.png"]
    assert _files(out / "error") == ["bad.png", "bad.png.error.txt"]
    mask = out / "masks" / "sub" / "a_png.png"
    mask_mtime = mask.stat().st_mtime_ns

    # crash between row and move: the file is back in IN_DIR with its row in the journal -> moved only
    os.rename(in_dir / "done" / "sub" / "a.png", in_dir / "sub" / "a.png")
    st = FolderWatcher(setup["insp"], in_dir, out, opts).run()
    assert (st.files, st.rows, st.recovered) == (1, 0, 1)
    assert len(_rows(out)) == 2 and mask.stat().st_mtime_ns == mask_mtime
    assert _files(in_dir) == ["done/sub/a.png"]

    # a new file under a used name: new id and output names, the earlier file in done/ stays untouched
    (in_dir / "sub" / "a.png").write_bytes(setup["pngs"][3])
    st = FolderWatcher(setup["insp"], in_dir, out, opts).run()
    assert (st.files, st.rows, st.recovered) == (1, 1, 0)
    rows = _rows(out)
    assert [r["id"] for r in rows] == ["sub/a.png", "bad.png", "sub/a.png~2"]  # bad.png: retried first
    assert rows[-1]["outputs"]["mask"] == "masks/sub/a_png~2.png"
    assert (in_dir / "done" / "sub" / "a.png").read_bytes() == setup["pngs"][2]
    assert (in_dir / "done" / "sub" / "a~2.png").read_bytes() == setup["pngs"][3]
    assert mask.stat().st_mtime_ns == mask_mtime

    # nothing new: --once returns without touching anything
    st = FolderWatcher(setup["insp"], in_dir, out, opts).run()
    assert (st.files, st.rows) == (0, 0) and len(_rows(out)) == 3


def test_folder_checks_and_single_watcher_per_out(setup: dict, tmp_path: Path) -> None:
    in_dir, out = tmp_path / "in", tmp_path / "out"
    in_dir.mkdir()
    with pytest.raises(WatchError, match="watched folder not found"):
        FolderWatcher(setup["insp"], tmp_path / "missing", out)
    with pytest.raises(WatchError, match="--done"):
        FolderWatcher(setup["insp"], in_dir, out, WatchOptions(done=in_dir))
    with pytest.raises(WatchError, match="--out"):
        FolderWatcher(setup["insp"], in_dir, tmp_path)
    w = FolderWatcher(setup["insp"], in_dir, out, FAST)
    try:
        with pytest.raises(WatchError, match="in use"):
            FolderWatcher(setup["insp"], in_dir, out, FAST)
    finally:
        w.close()
    FolderWatcher(setup["insp"], in_dir, out, FAST).close()  # the lock is released on close
    runner = CliRunner()  # usage errors exit 2 (in-process: the command restores the signal handlers)
    base = ["watch", "--model", str(setup["model"]), "--out", str(out), "--once"]
    assert runner.invoke(app, [*base[:1], str(tmp_path / "missing"), *base[1:]]).exit_code == 2
    assert runner.invoke(app, [*base[:1], str(in_dir), *base[1:], "--done", str(in_dir)]).exit_code == 2
    bad_model = ["watch", str(in_dir), "--model", str(tmp_path / "none.safetensors"), "--out", str(out)]
    assert runner.invoke(app, bad_model).exit_code == 2
    r = runner.invoke(app, [*base[:1], str(in_dir), *base[1:]])
    assert r.exit_code == 0, r.output
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    (tmp_path / "x.png").write_bytes(b"1")
    (tmp_path / "x~2.png").write_bytes(b"2")
    assert unique_path(tmp_path / "x.png") == tmp_path / "x~3.png"
    assert unique_path(tmp_path / "v.nii.gz") == tmp_path / "v.nii.gz"
    (tmp_path / "v.nii.gz").write_bytes(b"1")
    assert unique_path(tmp_path / "v.nii.gz") == tmp_path / "v~2.nii.gz"


def test_stop_finishes_the_current_batch(setup: dict, tmp_path: Path) -> None:
    """What SIGTERM/SIGINT do (their handlers set the stop event): the batch in hand is finished, journaled
    and moved; the rest stays in IN_DIR for the next run; the tables are finalised."""
    in_dir, out = tmp_path / "in", tmp_path / "out"
    in_dir.mkdir()
    for i in range(8):
        (in_dir / f"{i}.png").write_bytes(setup["pngs"][i])
    stop = threading.Event()
    w = FolderWatcher(setup["insp"], in_dir, out, WatchOptions(poll_s=0.05, settle_s=0.1, batch_size=3),
                      on_batch=lambda st: stop.set())  # fmt: skip
    t = threading.Thread(target=w.run, args=(stop,))
    t.start()
    t.join(timeout=30)
    assert not t.is_alive()
    rows = _rows(out)
    assert len(rows) == 3 and _files(out / "done") == sorted(r["id"] for r in rows)
    assert sorted(_files(in_dir) + _files(out / "done")) == sorted(f"{i}.png" for i in range(8))
    assert len((out / "results.csv").read_text().strip().splitlines()) == 4
    assert (out / "report.html").is_file()
