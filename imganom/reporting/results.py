"""The results table: ``results.jsonl`` (one JSON line per input, appended as results arrive, so an
interrupted run can be resumed) and ``results.csv``, both rewritten in input order by ``finalize``.

Rewrites are atomic (temp file in the target folder, then ``os.replace``) and fsynced.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

from imganom.data.names import printable
from imganom.utils.files import atomic_write_bytes, to_jsonable

CSV_COLUMNS = (
    "id", "path", "status", "verdict", "score", "norm_score", "n_regions", "max_region_area",
    "image_threshold", "pixel_threshold", "model_id", "time_ms", "error", "confidence",
)  # fmt: skip


def _printable_tree(x: Any) -> Any:
    """``x`` with every string (keys too) made printable (``names.printable``)."""
    if isinstance(x, str):
        return printable(x)
    if isinstance(x, dict):
        return {printable(str(k)): _printable_tree(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_printable_tree(v) for v in x]
    return x


def _dumps_line(row: dict) -> str:
    """One JSON line; a string that is not UTF-8 (a file name from another system) shows as ``\\xNN``."""
    line = json.dumps(to_jsonable(row), ensure_ascii=False, allow_nan=False)
    try:
        line.encode("utf-8")
    except UnicodeEncodeError:
        line = json.dumps(_printable_tree(to_jsonable(row)), ensure_ascii=False, allow_nan=False)
    return line + "\n"


def read_jsonl(path: Path) -> tuple[list[dict], bool]:
    """Rows of a results.jsonl and whether it needs rewriting (truncated or unterminated last line).

    Only the last line may be damaged (a run killed mid-append); damage elsewhere raises ValueError.
    """
    if not path.exists():
        return [], False
    text = path.read_text(encoding="utf-8", errors="replace")
    lines = text.split("\n")
    dirty = bool(lines[-1])  # last line lacks its newline
    if not lines[-1]:
        lines.pop()
    rows: list[dict] = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if not isinstance(row, dict) or "id" not in row:
                raise ValueError("not a result row")
        except ValueError as e:
            if i == len(lines) - 1:
                return rows, True
            raise ValueError(f"{path}: line {i + 1} is corrupt ({e})") from None
        rows.append(row)
    return rows, dirty


class ResultsWriter:
    """Append-only ``results.jsonl`` (one row per input) plus ``results.csv`` written by ``finalize``.

    Every row is flushed to the OS immediately (survives a killed process) and fsynced every
    ``fsync_every`` rows and on close. ``resume=True`` keeps an existing results.jsonl (dropping a
    truncated last line) and lists its ids in ``done_ids``; ``resume=False`` starts empty and removes a
    stale results.csv. Not thread-safe: call from one thread.
    """

    def __init__(
        self,
        out_dir: Path,
        resume: bool = False,
        *,
        fsync_every: int = 50,
        columns: Sequence[str] = CSV_COLUMNS,
    ) -> None:
        self.out_dir = Path(out_dir)
        self.columns = tuple(columns)  # of results.csv (volumes add theirs: workflows.volumes)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl_path = self.out_dir / "results.jsonl"
        self.csv_path = self.out_dir / "results.csv"
        self.fsync_every = max(1, fsync_every)
        self.done_ids: set[str] = set()
        if resume:
            rows, dirty = read_jsonl(self.jsonl_path)
            if dirty:
                atomic_write_bytes(self.jsonl_path, "".join(map(_dumps_line, rows)).encode(), fsync=True)
            self.done_ids = {str(r["id"]) for r in rows}
            self._fh: TextIO | None = open(self.jsonl_path, "a", encoding="utf-8")
        else:
            self.csv_path.unlink(missing_ok=True)
            self._fh = open(self.jsonl_path, "w", encoding="utf-8")
        self._unsynced = 0

    def write(self, row: dict) -> None:
        """Append one row (needs ``id``); missing columns become null, regions/outputs default to empty."""
        if self._fh is None:
            raise ValueError("ResultsWriter is closed")
        if "id" not in row:
            raise ValueError("result row needs an 'id'")
        full = {c: None for c in self.columns} | {"regions": [], "outputs": {}} | row
        self._fh.write(_dumps_line(full))
        self._fh.flush()
        self.done_ids.add(str(row["id"]))
        self._unsynced += 1
        if self._unsynced >= self.fsync_every:
            os.fsync(self._fh.fileno())
            self._unsynced = 0

    def close(self) -> None:
        """Flush, fsync and close the jsonl file (idempotent)."""
        if self._fh is not None:
            self._fh.flush()
            os.fsync(self._fh.fileno())
            self._fh.close()
            self._fh = None

    def finalize(self, order: list[str]) -> list[dict]:
        """Rewrite results.jsonl and results.csv in input order, one row per id (the last written wins).

        Rows whose id is not in ``order`` are kept, after the ordered ones. Closes the writer.
        """
        self.close()
        rows, _ = read_jsonl(self.jsonl_path)
        latest: dict[str, dict] = {}
        for r in rows:
            latest.pop(str(r["id"]), None)  # re-insert so unordered leftovers keep their last position
            latest[str(r["id"])] = r
        ordered = [latest.pop(i) for i in dict.fromkeys(order) if i in latest]
        ordered += latest.values()
        atomic_write_bytes(self.jsonl_path, "".join(map(_dumps_line, ordered)).encode(), fsync=True)

        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(self.columns)
        for r in ordered:
            w.writerow(["" if r.get(c) is None else r[c] for c in self.columns])
        atomic_write_bytes(self.csv_path, buf.getvalue().encode("utf-8"), fsync=True)
        return ordered

    def __enter__(self) -> ResultsWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
