"""Static, self-contained HTML review report for ``imganom inspect`` (``OUT/report.html``).

One file with inline CSS/JS and no network access, so it works opened from ``file://`` and can be
zipped with the output folder. Images are referenced by relative paths; the row data is embedded as
JSON and cards are rendered in pages by the browser so 5,000+ rows stay responsive. The score
histogram is an inline SVG computed here.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
from pathlib import Path
from typing import Any
from urllib.parse import quote

import jinja2
from markupsafe import Markup

from imganom.reporting.reviews import REVIEWS_FILE, ReviewStore, review_stats
from imganom.utils.files import atomic_write_bytes, to_jsonable
from imganom.utils.version import __version__

IMAGE_KINDS = ("preview", "overlay", "mask", "uncertainty", "reconstruction", "residual")
MAX_REGIONS_IN_REPORT = 50  # per row, for the lightbox table; keeps the embedded JSON small
HIST_BINS = 40
HIST_BASE, HIST_PLOT_H = 140.0, 130.0  # SVG y of the x axis and height of the tallest bar


def category(row: dict) -> str:
    if row.get("status") == "error":
        return "error"
    if row.get("verdict") == "review":  # low confidence (ops.uncertainty): filed under its thresholded call
        return "ng" if (row.get("uncertainty") or {}).get("is_anomalous") else "ok"
    return "ng" if row.get("verdict") == "NG" else "ok"


def _num(x: Any) -> float | None:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _sort_key(row: dict) -> tuple:
    """Errors first (by id), then score descending, unscored rows last."""
    if category(row) == "error":
        return (0, 0.0, str(row.get("id")))
    score = _num(row.get("score"))
    return (1, 0.0, str(row.get("id"))) if score is None else (1, -score, str(row.get("id")))


def card_data(row: dict) -> dict:
    """The subset of a result row the page needs; image paths are URL-quoted for use in ``src``."""
    outputs = row.get("outputs") or {}
    return {
        "id": str(row.get("id")),
        "cat": category(row),
        "verdict": row.get("verdict"),
        "score": _num(row.get("score")),
        "norm": _num(row.get("norm_score")),
        "nreg": row.get("n_regions"),
        "maxarea": row.get("max_region_area"),
        "error": row.get("error"),
        "img": {k: quote(str(outputs[k])) for k in IMAGE_KINDS if outputs.get(k)},
        "regions": (row.get("regions") or [])[:MAX_REGIONS_IN_REPORT],
        "conf": _num(row.get("confidence")),
        "review": row.get("verdict") == "review",
        "expl": row.get("explanation"),
    }


def _latent_view(view: dict | None, rows: list[dict]) -> dict | None:
    """The 2-D latent projection laid out for a 1000 x 420 SVG viewBox: ``normals`` [[x, y]] (the training
    normals' PCA points) and ``points`` {id: [x, y]} of the inspected images; ``note`` instead when the
    model has no latent statistics."""
    if view is None or view.get("note"):
        return view
    normals, points = view["normals"], view["points"]
    xy = list(normals) + list(points.values())
    if not xy:
        return None
    xs, ys = [p[0] for p in xy], [p[1] for p in xy]
    x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
    sx, sy = 960 / max(x1 - x0, 1e-9), 380 / max(y1 - y0, 1e-9)

    def at(p: list[float]) -> list[float]:
        return [round(20 + (p[0] - x0) * sx, 1), round(400 - (p[1] - y0) * sy, 1)]

    cats = {str(r.get("id")): category(r) for r in rows}
    return {
        "normals": [at(p) for p in normals],
        "points": [{"id": k, "xy": at(p), "cat": cats.get(k, "ok")} for k, p in points.items()],
        "basis": view.get("basis", "PCA of the normals' latent means"),
    }


def _histogram(rows: list[dict], threshold: float | None) -> dict | None:
    """Stacked OK/NG score histogram laid out for a 1000-wide SVG viewBox (None without scores)."""
    scored = ((_num(r.get("score")), category(r)) for r in rows if category(r) != "error")
    pts = [(s, cat) for s, cat in scored if s is not None]
    if not pts:
        return None
    lo = min([s for s, _ in pts] + ([threshold] if threshold is not None else []))
    hi = max([s for s, _ in pts] + ([threshold] if threshold is not None else []))
    if hi - lo < 1e-12:
        lo, hi = lo - 0.5, hi + 0.5
    pad = 0.02 * (hi - lo)
    lo, hi = lo - pad, hi + pad
    width = (hi - lo) / HIST_BINS
    ok, ng = [0] * HIST_BINS, [0] * HIST_BINS
    for s, cat in pts:
        b = min(HIST_BINS - 1, int((s - lo) / width))
        (ng if cat == "ng" else ok)[b] += 1
    peak = max(o + n for o, n in zip(ok, ng, strict=True))
    bw = 1000 / HIST_BINS
    bars = []
    for b in range(HIST_BINS):
        h_ok, h_ng = HIST_PLOT_H * ok[b] / peak, HIST_PLOT_H * ng[b] / peak
        x0 = lo + b * width
        y_ok = HIST_BASE - h_ok
        bars.append({
            "x": b * bw + 1, "w": bw - 2, "ok_y": y_ok, "ok_h": h_ok, "ng_y": y_ok - h_ng,
            "ng_h": h_ng, "title": f"{x0:.4g} – {x0 + width:.4g}: {ok[b]} OK, {ng[b]} NG",
        })  # fmt: skip
    thr_x = None if threshold is None else 1000 * (threshold - lo) / (hi - lo)
    return {
        "bars": bars,
        "lo": lo,
        "hi": hi,
        "peak": peak,
        "threshold": threshold,
        "thr_x": thr_x,
        "base": HIST_BASE,
    }


def _json_for_script(obj: Any) -> Markup:
    """JSON safe inside ``<script type="application/json">``: '<', '>', '&' and U+2028/9 are escaped."""
    text = json.dumps(to_jsonable(obj), ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    for ch, esc in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"), ("\u2028", "\\u2028"),
                    ("\u2029", "\\u2029")):  # fmt: skip
        text = text.replace(ch, esc)
    return Markup(text)


def _env() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("imganom.reporting", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["num"] = lambda v, fmt=".4g": "–" if _num(v) is None else format(float(v), fmt)
    return env


def render_page(template: str, path: Path, **context: Any) -> Path:
    """Render one of the package's report templates to ``path`` (atomically); ``version`` and ``generated``
    (now, local time) are added to ``context``. Returns ``path``."""
    html = (
        _env()
        .get_template(template)
        .render(
            **context,
            version=__version__,
            generated=_dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        )
    )
    atomic_write_bytes(Path(path), html.encode("utf-8"))
    return Path(path)


def write_report(
    out_dir: Path,
    rows: list[dict],
    summary: dict,
    title: str = "imganom inspection report",
    latent_view: dict | None = None,
) -> Path:
    """Render ``out_dir/report.html`` (atomically) from result rows and the run summary; returns its path.

    ``rows`` are results.jsonl rows (output paths relative to ``out_dir``); ``summary`` holds ``counts``,
    ``thresholds`` {image, pixel}, ``model`` {id, name}, ``throughput_img_s``, ``started``, ``finished``;
    other scalar entries are listed under "Run details". The histogram uses ``score`` against the image
    threshold. ``latent_view``: {``normals``: [[x, y]], ``points``: {id: [x, y]}} (the latent projection,
    ``ops.latent.project``) or {``note``: why there is none}.
    """
    out_dir = Path(out_dir)
    ordered = sorted(rows, key=_sort_key)
    cards = [card_data(r) for r in ordered]
    reviews = None
    if (out_dir / REVIEWS_FILE).exists():  # reviewer decisions (imganom review): a badge per card + stats
        decided = ReviewStore(out_dir).latest()
        reviews = review_stats(ordered, decided)
        for c in cards:
            d = decided.get(c["id"])
            if d:
                c["decision"] = {k: d.get(k) for k in ("decision", "label", "reviewer")}
    cats = [category(r) for r in ordered]
    counts = {"all": len(ordered), **{c: cats.count(c) for c in ("ng", "ok", "error")}}
    sc = summary.get("counts") or {}
    header_counts = {
        "total": sc.get("total", counts["all"]),
        "ng": sc.get("ng", counts["ng"]),
        "ok": sc.get("ok", counts["ok"]),
        "error": sc.get("error", counts["error"]),
        "review": sum(r.get("verdict") == "review" for r in ordered),  # filed under NG/OK as well
    }
    thresholds = summary.get("thresholds") or {}
    known = {"counts", "thresholds", "model", "throughput_img_s", "started", "finished"}
    extra = {k: v for k, v in summary.items() if k not in known and isinstance(v, (str, int, float, bool))}
    return render_page(
        "report.html.j2",
        out_dir / "report.html",
        title=title,
        counts=counts,
        header_counts=header_counts,
        thresholds=thresholds,
        model=summary.get("model") or {},
        throughput=summary.get("throughput_img_s"),
        started=summary.get("started"),
        finished=summary.get("finished"),
        extra=extra,
        hist=_histogram(ordered, _num(thresholds.get("image"))),
        data=_json_for_script(cards),
        reviews=reviews,
        latent=_latent_view(latent_view, ordered),
    )
