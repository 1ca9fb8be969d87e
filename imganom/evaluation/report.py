"""The evaluation report: ROC, precision-recall, score-histogram and PRO plots (matplotlib, rendered to
inline PNGs) and ``OUT/report.html`` from ``metrics.json`` contents; self-contained, no network access."""

from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import Any

import numpy as np

from imganom.reporting.html import render_page

_BG, _FG, _MUTED, _GRID = "#171b21", "#e6e8eb", "#98a2ad", "#2a313b"
_OK, _NG, _ACCENT, _THR = "#30a46c", "#e5484d", "#4c8dff", "#ffd166"


def _figure():
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.6, 3.4), dpi=110, facecolor=_BG)
    ax = fig.add_subplot()
    ax.set_facecolor(_BG)
    for s in ax.spines.values():
        s.set_color(_GRID)
    ax.tick_params(colors=_MUTED, labelsize=8)
    ax.grid(True, color=_GRID, linewidth=0.6)
    return fig, ax


def _finish(fig, ax, title: str, xlabel: str, ylabel: str, legend: str = "lower right") -> str:
    """Label the axes and return the figure as a base64 PNG data URI."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    ax.set_title(title, color=_FG, fontsize=10)
    ax.set_xlabel(xlabel, color=_MUTED, fontsize=9)
    ax.set_ylabel(ylabel, color=_MUTED, fontsize=9)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, facecolor=_BG, edgecolor=_GRID, labelcolor=_FG, loc=legend)
    fig.tight_layout()
    buf = io.BytesIO()
    FigureCanvasAgg(fig).print_png(buf)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _unavailable(ax, why: str) -> None:
    ax.text(
        0.5, 0.5, f"not available:\n{why}", color=_MUTED, ha="center", va="center", transform=ax.transAxes
    )


def _fmt(v: Any, spec: str = ".3f") -> str:
    return "–" if v is None else format(float(v), spec)


def aupro_key(fpr_limit: float) -> str:
    """The metrics key of the AUPRO up to ``fpr_limit``, e.g. ``aupro_0.3``."""
    return f"aupro_{fpr_limit:g}"


def _plots(m: dict[str, Any], scores: np.ndarray, labels: np.ndarray) -> dict[str, str]:
    c, reasons = m["curves"], m["reasons"]
    fpr_limit = m["settings"]["fpr_limit"]
    plots = {}

    fig, ax = _figure()
    ax.plot([0, 1], [0, 1], color=_GRID, linestyle=":")
    if c["image_roc"]:
        ax.plot(c["image_roc"]["fpr"], c["image_roc"]["tpr"], color=_ACCENT,
                label=f"image AUROC {_fmt(m['image']['auroc'])}")  # fmt: skip
    if c["pixel_roc"]:
        ax.plot(c["pixel_roc"]["fpr"], c["pixel_roc"]["tpr"], color=_THR, linestyle="--",
                label=f"pixel AUROC {_fmt(m['pixel']['auroc'])}")  # fmt: skip
    if not (c["image_roc"] or c["pixel_roc"]):
        _unavailable(ax, reasons["image"].get("auroc", ""))
    plots["roc"] = _finish(fig, ax, "ROC", "false positive rate", "true positive rate")

    fig, ax = _figure()
    if c["image_pr"]:
        prevalence = float(labels.mean())
        ax.axhline(prevalence, color=_GRID, linestyle=":")
        ax.plot(c["image_pr"]["recall"], c["image_pr"]["precision"], color=_ACCENT,
                label=f"AP {_fmt(m['image']['ap'])}")  # fmt: skip
        ax.set_ylim(0, 1.02)
    else:
        _unavailable(ax, reasons["image"].get("ap", ""))
    plots["pr"] = _finish(fig, ax, "Precision-recall (image level)", "recall", "precision")

    fig, ax = _figure()
    thr = m["threshold"]["image"]
    lo, hi = float(scores.min()), float(scores.max())
    if thr is not None:
        lo, hi = min(lo, thr), max(hi, thr)
    edges = np.linspace(lo, hi if hi > lo else lo + 1.0, 41)
    for y, colour, name in ((0, _OK, "good"), (1, _NG, "anomalous")):
        if (labels == y).any():
            ax.hist(
                scores[labels == y],
                bins=edges,
                color=colour,
                alpha=0.7,
                label=f"{name} ({(labels == y).sum()})",
            )
    if thr is not None:
        ax.axvline(thr, color=_THR, linestyle="--", label=f"threshold {thr:.4g}")
    plots["hist"] = _finish(fig, ax, "Image scores", "score", "images", legend="upper right")

    fig, ax = _figure()
    if c["pro"]:
        ax.plot(
            c["pro"]["fpr"],
            c["pro"]["pro"],
            color=_ACCENT,
            label=f"AUPRO@{fpr_limit:g} {_fmt(m['pixel'][aupro_key(fpr_limit)])}",
        )
        ax.set_xlim(0, fpr_limit)
        ax.set_ylim(0, 1.02)
    else:
        _unavailable(ax, reasons["pixel"].get(aupro_key(fpr_limit), ""))
    plots["pro"] = _finish(
        fig, ax, f"Per-region overlap up to FPR {fpr_limit:g}", "pixel false positive rate", "PRO"
    )
    return plots


def write_evaluation_report(
    out: str | Path,
    metrics: dict[str, Any],
    scores: np.ndarray,
    labels: np.ndarray,
    title: str = "imganom evaluation",
) -> Path:
    """Render ``out/report.html`` (self-contained: plots and worst-case overlays embedded as base64 PNG)."""
    out = Path(out)
    worst = {}
    for name, cases in metrics["worst"].items():
        worst[name] = [
            {
                **c,
                "src": "data:image/png;base64,"
                + base64.b64encode((out / c["overlay"]).read_bytes()).decode(),
            }
            for c in cases
        ]
    return render_page(
        "evaluate.html.j2",
        out / "report.html",
        title=title,
        m=metrics,
        plots=_plots(metrics, scores, labels),
        worst=worst,
        aupro_key=aupro_key(metrics["settings"]["fpr_limit"]),
    )
