"""``imganom watch``: inspect images as they land in a folder, then move each to done/ or error/.

Polling only (no extra dependency). A file is a candidate when its name is not hidden, not a temp/partial
name (``.tmp``, ``.part``, ``.crdownload``, ...) and has an image extension; it is *ready* once its signature
(size, mtime, ctime, inode) is unchanged across two polls at least ``settle_s`` apart and it can be opened, so
both slow writers and write-to-temp-then-rename writers are handled. A ready file that cannot be decoded is
read again until it has been unchanged for ``retry_s`` (a writer that pauses mid-file longer than
``settle_s``); only then does it get its error row and go to error/. Ready files are inspected together
(batched), with the outputs ``imganom inspect`` writes (rows appended to ``OUT/results.jsonl``; masks,
heatmaps, overlays and previews mirroring the relative path; results.csv, summary.json and report.html
rewritten on exit), then moved to ``done/`` (or ``error/`` with ``<name>.error.txt`` beside it), keeping
relative paths and adding ``~2``, ``~3``... before the extension instead of ever replacing a file. Defaults:
``OUT/done`` and ``OUT/error`` (beside the results that describe them, and never inside the watched tree).

Exactly once. The journal is ``OUT/results.jsonl``; a file's identity is its relative path and the SHA-256
of its bytes (with the model that judged it). A file leaves IN_DIR only after all its rows are appended and
fsynced, so nothing is moved without its result, and no input is ever deleted. A ready file whose identity
already has rows for all its items is moved without being inspected again, so a crash between row and move
never yields a second row; a crash before the rows are durable leaves the file with no complete row, and it
is inspected again (a torn last line is dropped, outputs are rewritten atomically under the same names). A
*different* file under an already used relative path, even one with the same size and mtime (``cp -p``,
``rsync -t``), gets the id ``rel~2`` (``~3``...) and its own row, so ids and output names stay unique. A file
that changes while it is read is looked at again later. done/ and error/ are never scanned, and moves are
renames that never replace a file. Each row also records ``source`` (``rel``, ``size``, ``mtime_ns``,
``sha256``) and ``moved_to`` (relative to OUT when inside it). File names that are not UTF-8 keep their bytes
on disk; ids and rows show them as ``\\xNN``. One watcher per OUT (an advisory lock on ``OUT/.watch.lock``).
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from imganom.data.names import printable
from imganom.inference.inspector import Inspector
from imganom.reporting.results import ResultsWriter, read_jsonl
from imganom.reporting.writers import OutputOptions
from imganom.utils.files import atomic_write_bytes, write_json_atomic
from imganom.workflows.folders import (
    FileSig,
    WatchError,
    content_hash,
    file_sig,
    fsync_dir,
    is_candidate,
    lock_folder,
    move_no_clobber,
    openable,
    unique_path,
    unlock_folder,
)
from imganom.workflows.inspect import (
    Decoder,
    InspectStats,
    Item,
    build_summary,
    file_items,
    predict_decoded,
    result_row,
    write_outputs,
)

log = logging.getLogger(__name__)
LOCK_NAME = ".watch.lock"
SUMMARY_EVERY_S = 5.0  # summary.json is refreshed after a batch at most this often (and always on exit)
_SLIM_KEYS = ("id", "status", "verdict", "score", "error", "source", "moved_to", "model_id")


def _slim(row: dict) -> dict:
    """What the watcher keeps in memory per row (journal lookups, summary); full rows live on disk."""
    return {k: row.get(k) for k in _SLIM_KEYS}


@dataclass
class WatchOptions:
    """How ``FolderWatcher`` polls, batches and where it moves files (None: ``OUT/done``, ``OUT/error``)."""

    done: Path | None = None
    error: Path | None = None
    poll_s: float = 0.5
    settle_s: float = 1.0
    retry_s: float = 30.0  # an undecodable file is retried until unchanged this long, then failed
    recursive: bool = True
    batch_size: int = 16
    once: bool = False
    outputs: OutputOptions = field(default_factory=OutputOptions)
    report: bool = True


@dataclass
class WatchStats:
    """Counts for this run of the watcher (earlier runs' rows are not included)."""

    files: int = 0  # files moved out of IN_DIR
    rows: int = 0  # rows written
    ok: int = 0
    ng: int = 0
    error: int = 0
    recovered: int = 0  # files moved on the strength of an earlier run's rows (not inspected again)
    batches: int = 0


@dataclass
class _Ready:
    path: Path
    rel: str  # relative posix path as on disk (bytes that are not UTF-8 as surrogates)
    sig: FileSig
    stable_s: float  # how long the file has been unchanged (observed, or by its mtime if longer)

    @property
    def name(self) -> str:
        """``rel`` as printable text: the base of the file's ids."""
        return printable(self.rel)


@dataclass(eq=False)
class _Job:
    """One ready file, its items and their rows: from the journal (earlier runs) or inspected now."""

    file: _Ready
    sha256: str
    base_id: str
    items: list[Item]
    journaled: dict[str, dict] = field(default_factory=dict)  # already in results.jsonl
    new: dict[str, dict] = field(default_factory=dict)  # inspected in this pass, journaled by _finish
    deferred: bool = False  # the file changed while being read: not finished in this pass

    @property
    def rows(self) -> list[dict]:
        return [*self.journaled.values(), *self.new.values()]

    @property
    def complete(self) -> bool:
        return not self.deferred and all(it.id in self.journaled or it.id in self.new for it in self.items)


class FolderWatcher:
    """Watches ``in_dir`` and inspects ready files with ``insp``; see the module docstring for the contract.

    Use ``run(stop)`` (returns when ``stop`` is set, or after the first files with ``once``), or drive it with
    ``poll()`` + ``process()`` and ``close()``. Not thread-safe; one watcher per ``out``.
    """

    def __init__(
        self,
        insp: Inspector,
        in_dir: str | Path,
        out: str | Path,
        options: WatchOptions | None = None,
        on_batch: Callable[[WatchStats], None] | None = None,
    ) -> None:
        self.insp, self.opt, self.on_batch = insp, options or WatchOptions(), on_batch
        self.in_dir, self.out = Path(in_dir), Path(out)
        if not self.in_dir.is_dir():
            raise WatchError(f"watched folder not found: {self.in_dir}")
        self.out = self.out.absolute()
        self.done_dir = Path(self.opt.done).absolute() if self.opt.done else self.out / "done"
        self.error_dir = Path(self.opt.error).absolute() if self.opt.error else self.out / "error"
        root = self.in_dir.resolve()
        for name, d in (("--out", self.out), ("--done", self.done_dir), ("--error", self.error_dir)):
            r = d.resolve()
            if r == root or root.is_relative_to(r):
                raise WatchError(f"{name} {d} must not be the watched folder or contain it")
        # inside the watched tree these folders are skipped by the scan
        self._skip = {d.resolve() for d in (self.out, self.done_dir, self.error_dir)}
        self.out.mkdir(parents=True, exist_ok=True)
        self._lock_fh = lock_folder(self.out / LOCK_NAME)
        self.writer = ResultsWriter(self.out, resume=True, fsync_every=1)  # repairs a torn last line
        fsync_dir(self.out)
        self.rows = [_slim(r) for r in read_jsonl(self.writer.jsonl_path)[0]]  # journal order
        self.n_earlier = len(self.rows)
        self._by_key: dict[tuple[str, str, str], dict[str, dict]] = {}  # (rel, sha256, model) -> rows
        self._used_ids = {str(r["id"]).split("#slice=")[0] for r in self.rows}
        for r in self.rows:
            self._remember(r)
        self._seen: dict[Path, tuple[FileSig, float]] = {}  # signature, since when (monotonic)
        self._hold: dict[Path, tuple[FileSig, float]] = {}  # undecodable for now: not before (monotonic)
        self._unlistable: set[str] = set()
        self._attempted: set[Path] = set()  # with ``once``: files _finish was called for
        self._summary_at = 0.0
        self.stats = WatchStats()
        self.started = dt.datetime.now(dt.timezone.utc)
        self._t0 = time.perf_counter()
        self._closed = False

    # ---- journal -------------------------------------------------------------------------------------------
    def _remember(self, row: dict) -> None:
        src = row.get("source")
        if isinstance(src, dict) and {"rel", "sha256"} <= src.keys():  # rows of older versions: no hash
            key = (str(src["rel"]), str(src["sha256"]), str(row.get("model_id")))
            self._by_key.setdefault(key, {})[str(row["id"])] = row

    def _free_id(self, rel: str) -> str:
        """``rel``, or ``rel~2``, ``rel~3``... if an earlier file used it (ids are reserved by _finish)."""
        cand, n = rel, 1
        while cand in self._used_ids:
            n += 1
            cand = f"{rel}~{n}"
        return cand

    # ---- scanning ------------------------------------------------------------------------------------------
    def scan(self) -> Iterator[tuple[Path, str]]:
        """Candidate files under the watched folder as (path, relative posix path), sorted by the latter."""
        found: list[tuple[str, Path]] = []
        for dirpath, dirnames, filenames in os.walk(self.in_dir, onerror=self._unlisted):
            subdirs = [d for d in dirnames if not d.startswith(".")] if self.opt.recursive else []
            dirnames[:] = [d for d in subdirs if Path(dirpath, d).resolve() not in self._skip]
            for f in filenames:
                if is_candidate(f):
                    p = Path(dirpath) / f
                    found.append((p.relative_to(self.in_dir).as_posix(), p))
        found.sort()
        for rel, p in found:
            yield p, rel

    def _unlisted(self, e: OSError) -> None:
        """os.walk's error hook: a folder that cannot be listed is named once in the log, not skipped."""
        where = printable(str(e.filename))
        if where not in self._unlistable:
            self._unlistable.add(where)
            log.warning("cannot list %s (%s): its files are not watched", where, e.strerror or e)

    def poll(self) -> list[_Ready]:
        """One polling pass: update each candidate's signature history and return the ready ones."""
        now, wall = time.monotonic(), time.time()
        ready, present = [], set()
        for path, rel in self.scan():
            sig = file_sig(path)
            if sig is None:
                continue
            present.add(path)
            prev = self._seen.get(path)
            if prev is None or prev[0] != sig:
                self._seen[path] = (sig, now)
                self._hold.pop(path, None)
                continue
            held = self._hold.get(path)
            if held is not None and held[0] == sig and now < held[1]:
                continue
            if now - prev[1] >= self.opt.settle_s and openable(path):
                stable = max(now - prev[1], wall - sig.mtime_ns / 1e9)
                ready.append(_Ready(path, rel, sig, stable))
        for gone in set(self._seen) - present:
            del self._seen[gone]
            self._hold.pop(gone, None)
        return ready

    # ---- processing ----------------------------------------------------------------------------------------
    def _job(self, f: _Ready) -> _Job | None:
        """The job of a ready file (its content hashed), or None if it changed or vanished meanwhile."""
        try:
            sha = content_hash(f.path)
        except OSError:
            sha = None
        if sha is None or file_sig(f.path) != f.sig:
            self._seen.pop(f.path, None)  # look again once it is stable
            return None
        known = self._by_key.get((f.name, sha, str(self.insp.model_id)), {})
        base = next(iter(known), None)
        base = base.split("#slice=")[0] if base else self._free_id(f.name)
        items = file_items(f.path, base)
        ids = {it.id for it in items}
        return _Job(f, sha, base, items, {i: r for i, r in known.items() if i in ids})

    def process(self, ready: list[_Ready], stop: threading.Event | None = None) -> None:
        """Inspect the ready files in batches of ``batch_size`` items, write their rows, move them.

        Files whose rows are already in the journal are only moved. Stops between batches once ``stop`` is
        set.
        """
        jobs = [job for job in map(self._job, ready) if job is not None]
        recovered = [job for job in jobs if job.complete]
        for job in recovered:
            self._finish(job, recovered=True)
        todo = [(j, it) for j in jobs if not j.complete for it in j.items if it.id not in j.journaled]
        bs = max(1, self.opt.batch_size)
        for start in range(0, len(todo), bs):
            if stop is not None and stop.is_set():
                break
            chunk = todo[start : start + bs]
            self._inspect(chunk)
            for job in dict.fromkeys(j for j, _ in chunk):
                if job.complete:
                    self._finish(job, recovered=False)
            self.stats.batches += 1
            self._after_batch()
        if recovered and not todo:
            self._after_batch()

    def _after_batch(self) -> None:
        if time.monotonic() - self._summary_at >= SUMMARY_EVERY_S:
            self._summary_at = time.monotonic()
            write_json_atomic(self.out / "summary.json", self._summary())
        if self.on_batch:
            self.on_batch(self.stats)

    def _inspect(self, chunk: list[tuple[_Job, Item]]) -> None:
        """Decode, predict and write the outputs of one batch of items; rows go into their jobs (not yet
        into the journal)."""
        dec = Decoder([it for _, it in chunk], self.insp)
        decoded = [dec[i] for i in range(len(chunk))]
        live: list[tuple[_Job, Item, dict]] = []
        for (job, it), d in zip(chunk, decoded):
            f = job.file
            if job.deferred:
                continue
            if file_sig(f.path) != f.sig:  # changed or vanished since it was hashed: look again later
                self._seen.pop(f.path, None)
                job.deferred = True
            elif d["error"] is not None and f.stable_s < self.opt.retry_s:  # maybe still being written
                wait = min(self.opt.retry_s - f.stable_s, max(self.opt.settle_s, 0.5))
                self._hold[f.path] = (f.sig, time.monotonic() + wait)
                job.deferred = True
                log.info("%s cannot be read yet (%s); trying again", f.name, d["error"])
            else:
                live.append((job, it, d))
        results = predict_decoded(self.insp, [(it, d) for _, it, d in live])
        for (job, it, d), r in zip(live, results):
            err, outputs = d["error"], {}
            if r is not None:
                try:
                    outputs = write_outputs(self.out, r, self.opt.outputs)
                except Exception as e:  # noqa: BLE001 - a failed write is recorded, not fatal
                    r, err = None, f"{it.path}: writing outputs failed: {e}"
            row = result_row(self.insp, it, r, err, outputs)
            f = job.file
            row["source"] = {"rel": f.name, "size": f.sig.size, "mtime_ns": f.sig.mtime_ns,
                             "sha256": job.sha256}  # fmt: skip
            job.new[it.id] = row

    def _finish(self, job: _Job, recovered: bool) -> None:
        """Journal the job's new rows (fsynced), then move the file to done/ or error/."""
        f = job.file
        if self.opt.once:
            self._attempted.add(f.path)
        self._used_ids.add(job.base_id)
        failed = any(r.get("status") == "error" for r in job.rows)
        base = self.error_dir if failed else self.done_dir
        planned = next((r["moved_to"] for r in job.journaled.values() if r.get("moved_to")), None)
        if planned and f.name == f.rel:  # relative to OUT; \xNN in a journaled name is not the real name
            dst = self.out / planned
        else:
            dst = unique_path(base / f.rel, sidecar=".error.txt" if failed else "")
        for r in job.new.values():
            r["moved_to"] = dst.relative_to(self.out).as_posix() if dst.is_relative_to(self.out) else str(dst)
            self.writer.write(r)  # flushed and fsynced (fsync_every=1) before the move below
            self.rows.append(_slim(r))
            self._remember(self.rows[-1])
            self.stats.rows += 1
            if r["status"] == "ok":
                self.stats.ok += 1
                self.stats.ng += r["verdict"] == "NG"
            else:
                self.stats.error += 1
        if dst.exists():  # the same bytes dropped again, or someone else's file: never replace, never delete
            dst = unique_path(dst, sidecar=".error.txt" if failed else "")
        try:
            if failed:
                errs = [f"{r['id']}: {r.get('error')}" for r in job.rows if r.get("error")]
                reasons = "\n".join(errs)
                text = f"{f.name}\n{reasons}\nfailed at {dt.datetime.now().astimezone().isoformat()}\n"
                atomic_write_bytes(dst.with_name(dst.name + ".error.txt"), text.encode("utf-8"))
            move_no_clobber(f.path, dst)
        except FileNotFoundError:
            log.warning("%s vanished before it could be moved (its rows are in results.jsonl)", f.name)
            return
        except OSError as e:
            log.error("cannot move %s to %s: %s (will retry)", f.name, printable(str(dst)), e)
            return
        self._moved(job, dst, recovered)

    def _moved(self, job: _Job, dst: Path, recovered: bool) -> None:
        self._seen.pop(job.file.path, None)
        self.stats.files += 1
        self.stats.recovered += recovered
        note = " (already inspected)" if recovered else ""
        log.info("%s -> %s%s", job.file.name, printable(str(dst)), note)

    # ---- summary and lifecycle -----------------------------------------------------------------------------
    def _summary(self) -> dict[str, Any]:
        st = InspectStats(total=len(self.rows), done=len(self.rows), skipped=self.n_earlier,
                          seconds=time.perf_counter() - self._t0)  # fmt: skip
        summary = build_summary(self.insp, self.rows, st, self.started)
        summary["watch"] = {"in_dir": str(self.in_dir), "done_dir": str(self.done_dir),
                            "error_dir": str(self.error_dir), **vars(self.stats)}  # fmt: skip
        return summary

    def run(self, stop: threading.Event | None = None) -> WatchStats:
        """Poll until ``stop`` is set; with ``once``, until every file present at the first poll has been
        handled (or has vanished). Finishes the current batch before returning; then ``close()``."""
        stop = stop or threading.Event()
        initial: set[Path] | None = None
        try:
            while True:
                ready = self.poll()
                if initial is None:
                    initial = set(self._seen)
                if ready:
                    self.process(ready, stop)
                if stop.is_set():
                    break
                if self.opt.once and not {p for p in initial - self._attempted if p in self._seen}:
                    break
                if stop.wait(self.opt.poll_s):
                    break
        finally:
            self.close()
        return self.stats

    def close(self) -> None:
        """Rewrite results.jsonl/results.csv (journal order), summary.json and report.html; release OUT."""
        if self._closed:
            return
        self._closed = True
        rows = self.writer.finalize([str(r["id"]) for r in self.rows])
        summary = self._summary()
        write_json_atomic(self.out / "summary.json", summary)
        if self.opt.report:
            from imganom.reporting.html import write_report

            write_report(self.out, rows, summary, title="imganom watch report")
        unlock_folder(self._lock_fh)
