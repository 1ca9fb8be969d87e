"""Reviewer decisions on an ``inspect`` results folder: ``RESULTS_DIR/reviews.jsonl``.

Append-only, one JSON object per line: ``{"id", "decision", "label", "note", "mask", "reviewer", "time",
"model_id", "score", "verdict"}`` with ``decision`` one of ``defect`` (the image is defective), ``normal``
(a false alarm when the model said NG), ``skip`` (looked at, no call) or ``undo`` (withdraws that image's
previous decision). Every append takes an exclusive ``fcntl`` lock on the file, writes the whole line in
one ``write`` and fsyncs before unlocking, so concurrent browser tabs, servers or CLI processes never
interleave or lose a line, and a killed writer leaves at most one unterminated last line (ignored on read).
The latest decision per image wins; the history stays in the file.

Corrected masks are PNGs under ``RESULTS_DIR/reviews/masks/`` (``mask`` holds the path relative to the
results folder). Used by the review app (``serve.review``), ``calibrate --reviews``, ``evaluate --reviews``
and the report (``reporting.html``): this module has no web or model dependencies.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import json
import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from imganom.reporting.results import read_jsonl
from imganom.reporting.writers import output_stem
from imganom.utils.files import atomic_write_bytes, to_jsonable, write_json_atomic

log = logging.getLogger(__name__)

REVIEWS_FILE = "reviews.jsonl"
MASKS_DIR = "reviews/masks"
DECISIONS = ("defect", "normal", "skip")
MAX_TEXT = 500  # characters kept of a label / note / reviewer name


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds")


def _text(v: Any, what: str) -> str | None:
    if v is None:
        return None
    if not isinstance(v, str):
        raise ValueError(f"{what} must be a string, got {type(v).__name__}")
    v = v.strip()[:MAX_TEXT]
    return v or None


@dataclass
class ReviewStore:
    """The decisions of one results folder; ``add`` appends (locked), ``latest`` / ``history`` read."""

    results_dir: Path
    _records: list[dict] = field(default_factory=list, repr=False)
    _offset: int = field(default=0, repr=False)  # bytes of the file already parsed

    def __post_init__(self) -> None:
        self.results_dir = Path(self.results_dir)

    @property
    def path(self) -> Path:
        return self.results_dir / REVIEWS_FILE

    def refresh(self) -> list[dict]:
        """Parse what other writers appended since the last call; returns all records in file order."""
        if not self.path.exists():
            self._records, self._offset = [], 0
            return self._records
        if self.path.stat().st_size < self._offset:  # replaced or truncated by hand: read it again
            self._records, self._offset = [], 0
        with open(self.path, "rb") as f:
            f.seek(self._offset)
            chunk = f.read()
        end = chunk.rfind(b"\n") + 1  # an unterminated last line is a write in progress (or a killed one)
        for line in chunk[:end].split(b"\n"):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except ValueError:
                log.warning("%s: skipping an unreadable line: %.80r", self.path, line)
                continue
            if isinstance(rec, dict) and isinstance(rec.get("id"), str):
                self._records.append(rec)
        self._offset += end
        return self._records

    def add(
        self,
        item_id: str,
        decision: str,
        *,
        reviewer: str | None = None,
        label: str | None = None,
        note: str | None = None,
        mask_png: bytes | None = None,
        model_id: str | None = None,
        score: float | None = None,
        verdict: str | None = None,
    ) -> dict:
        """Append one decision (``DECISIONS`` or ``undo``) and return the record written.

        ``mask_png`` (a corrected mask, PNG bytes) is checked to decode and saved first, so a record never
        points at a missing file. Raises ValueError on a bad decision, text field or mask."""
        if decision not in (*DECISIONS, "undo"):
            raise ValueError(f"decision must be one of {', '.join(DECISIONS)} or undo, got {decision!r}")
        if not isinstance(item_id, str) or not item_id:
            raise ValueError("id must be a non-empty string")
        rec: dict[str, Any] = {
            "id": item_id,
            "decision": decision,
            "label": _text(label, "label"),
            "note": _text(note, "note"),
            "mask": None,
            "reviewer": _text(reviewer, "reviewer"),
            "time": _now(),
            "model_id": model_id,
            "score": score,
            "verdict": verdict,
        }
        if mask_png is not None:
            rec["mask"] = self._save_mask(item_id, mask_png, rec["time"])
        line = (json.dumps(to_jsonable(rec), ensure_ascii=False, allow_nan=False) + "\n").encode("utf-8")
        self.results_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                if os.write(fd, line) != len(line):
                    raise OSError(f"{self.path}: short write")
                os.fsync(fd)
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)
        return rec

    def _save_mask(self, item_id: str, png: bytes, stamp: str) -> str:
        import cv2

        img = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_UNCHANGED) if png else None
        if img is None or not png.startswith(b"\x89PNG"):
            raise ValueError(f"corrected mask for {item_id!r} is not a readable PNG")
        safe = "".join(c for c in stamp if c.isalnum())
        rel = f"{MASKS_DIR}/{output_stem(item_id)}.{safe}.png"
        atomic_write_bytes(self.results_dir / rel, png, fsync=True)
        return rel

    def latest(self) -> dict[str, dict]:
        """The decision in force per image id: the last one, where ``undo`` withdraws the one before it."""
        stacks: dict[str, list[dict]] = {}
        for rec in self.refresh():
            st = stacks.setdefault(rec["id"], [])
            if rec.get("decision") == "undo":
                if st:
                    st.pop()
            elif rec.get("decision") in DECISIONS:
                st.append(rec)
        return {k: v[-1] for k, v in stacks.items() if v}

    def history(self, item_id: str) -> list[dict]:
        """Every record for one image, oldest first."""
        return [r for r in self.refresh() if r["id"] == item_id]


def load_decisions(results_dirs: Iterable[Path]) -> list[tuple[Path, dict]]:
    """(results folder, decision in force) for every reviewed image of the given folders (skips excluded)."""
    out = []
    for d in results_dirs:
        d = Path(d)
        if not (d / REVIEWS_FILE).exists():
            raise FileNotFoundError(f"{d}: no {REVIEWS_FILE} (review it first: imganom review {d})")
        out += [(d, rec) for rec in ReviewStore(d).latest().values() if rec["decision"] != "skip"]
    return out


def _rate(num: int, den: int) -> float | None:
    return num / den if den else None


def review_stats(rows: Sequence[dict], decisions: dict[str, dict]) -> dict[str, Any]:
    """Counts and measured rates of the decisions against the verdicts in ``rows`` (results rows).

    ``false_reject_rate``: of the images the reviewers confirmed normal, the share the model called NG;
    ``miss_rate``: of the confirmed defects, the share the model called OK; ``agreement``: the share of
    defect/normal decisions that match the verdict (NG = defect)."""
    verdicts = {str(r.get("id")): r.get("verdict") for r in rows}
    c = {"reviewed": 0, "defect": 0, "normal": 0, "skip": 0, "false_alarms": 0, "misses": 0}
    agree = 0
    for item_id, rec in decisions.items():
        if item_id not in verdicts:
            continue
        c["reviewed"] += 1
        c[rec["decision"]] += 1
        v = verdicts[item_id]
        if rec["decision"] == "normal":
            c["false_alarms"] += v == "NG"
            agree += v == "OK"
        elif rec["decision"] == "defect":
            c["misses"] += v == "OK"
            agree += v == "NG"
    judged = c["defect"] + c["normal"]
    return {
        **c,
        "unreviewed": len(verdicts) - c["reviewed"],
        "false_reject_rate": _rate(c["false_alarms"], c["normal"]),
        "miss_rate": _rate(c["misses"], c["defect"]),
        "agreement": _rate(agree, judged),
    }


def refresh_summary(results_dir: Path, rows: Sequence[dict] | None = None) -> dict:
    """Recompute ``summary.json``'s ``reviews`` block (``review_stats``) from ``reviews.jsonl`` and write it
    back (atomically); returns the whole summary. Called by the review app after each decision and by
    ``calibrate --reviews``."""
    results_dir = Path(results_dir)
    if rows is None:
        rows = read_jsonl(results_dir / "results.jsonl")[0]
    path = results_dir / "summary.json"
    summary = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
    summary["reviews"] = review_stats(rows, ReviewStore(results_dir).latest())
    write_json_atomic(path, summary)
    return summary


def resolve_inside(root: Path, rel: str) -> Path:
    """``root / rel`` resolved, or ValueError when it points outside ``root`` (``..``, absolute, links)."""
    base = Path(root).resolve()
    p = (base / rel).resolve()
    if not p.is_relative_to(base):
        raise ValueError(f"{rel!r} is outside {base}")
    return p
