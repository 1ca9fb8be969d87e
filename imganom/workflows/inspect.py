"""``imganom inspect``: every input gets exactly one row, whatever happens to the others.

Decoding runs on a few threads (or DataLoader worker processes), the device runs whole batches, and a small
thread pool encodes and writes the PNG outputs so the device never waits long on disk. Rows stream to
``results.jsonl`` as they finish (``--resume`` picks up from there) and are rewritten in input order at
the end.
"""

from __future__ import annotations

import datetime as dt
import functools
import io
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from imganom.data.discovery import expand_inputs
from imganom.data.names import printable
from imganom.data.readers import ImageReadError, count_slices, read_image, read_options, to_uint8_preview
from imganom.inference.inspector import Inspector, Result
from imganom.ops.latent import has_latent_stats, project
from imganom.reporting.results import ResultsWriter
from imganom.reporting.writers import OutputOptions, heatmap_vmax, write_item_outputs, write_trust_outputs
from imganom.utils.batching import batch_or_each
from imganom.utils.device import precision_label
from imganom.utils.files import atomic_write_bytes, write_json_atomic

log = logging.getLogger(__name__)
VOLUME_SUFFIXES = (".nii", ".nii.gz", ".dcm", ".dicom")
# what write_outputs creates under OUT
OUTPUT_FOLDERS = ("masks", "heatmaps", "overlays", "previews", "raw", "uncertainty", "explain")


@dataclass
class Item:
    path: Path
    id: str
    slice: int | None = None


def file_items(path: Path, item_id: str) -> list[Item]:
    """The items of one input file: one, or one per slice (ids ``ID#slice=0000``...) for a 3-D volume."""
    if path.name.lower().endswith(VOLUME_SUFFIXES):
        try:
            n = count_slices(path)
        except ImageReadError:
            n = 1  # the reader reports the error on the item itself
        if n > 1:
            return [Item(path, f"{item_id}#slice={k:04d}", k) for k in range(n)]
    return [Item(path, item_id)]


def outside(items: list[Item], inputs: Sequence[str | Path], out: Path) -> list[Item]:
    """``items`` less those under ``out`` when ``out`` lies inside an input folder, so a second run does not
    inspect the first one's masks and heatmaps (if ``out`` *is* an input folder: less its output folders)."""
    root = out.resolve()
    folders = [Path(p).resolve() for p in inputs if Path(p).is_dir()]
    if any(root == f for f in folders):
        skip = [root / kind for kind in OUTPUT_FOLDERS]
    elif any(root.is_relative_to(f) for f in folders):
        skip = [root]
    else:
        return items
    parents: dict[Path, Path] = {}

    def keep(it: Item) -> bool:
        if it.path.parent not in parents:
            parents[it.path.parent] = Path(os.path.realpath(it.path.parent))
        return not any(parents[it.path.parent].is_relative_to(s) for s in skip)

    kept = [it for it in items if keep(it)]
    if len(kept) < len(items):
        where = " ".join(str(s) for s in skip)
        log.warning("%d inputs under the output folder are not inspected (%s)", len(items) - len(kept), where)
    return kept


def list_items(inputs: Sequence[str | Path], recursive: bool = True) -> list[Item]:
    """Expand folders / files / list files into items; 3-D NIfTI volumes become one item per slice."""
    return [
        it for path, item_id in expand_inputs(inputs, recursive=recursive) for it in file_items(path, item_id)
    ]


class Decoder(Dataset):
    """Decodes one item (in a DataLoader worker, or inline by indexing); never raises: a failure comes back
    as an ``error`` string, so every item still gets its row."""

    def __init__(self, items: Sequence[Item], insp: Inspector):
        self.items = items
        self.kw = read_options(insp.cfg.preprocess)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        it = self.items[i]
        t0 = time.perf_counter()
        try:
            chw, meta = read_image(it.path, slice_index=it.slice, **self.kw)
            return {"i": i, "chw": chw, "meta": meta, "error": None, "ms": (time.perf_counter() - t0) * 1e3}
        except ImageReadError as e:
            return {"i": i, "chw": None, "meta": None, "error": str(e), "ms": 0.0}
        except Exception as e:  # noqa: BLE001 - a reader bug must not lose the row
            return {
                "i": i,
                "chw": None,
                "meta": None,
                "error": f"{it.path}: unexpected {type(e).__name__}: {e}",
                "ms": 0.0,
            }


def _collate(batch: list[dict]) -> list[dict]:
    return batch


DECODE_MODES = ("threads", "processes")


def threaded_batches(decoder: Decoder, batch_size: int, workers: int) -> Iterator[list[dict]]:
    """``decoder``'s items in order, in lists of ``batch_size``, decoded on ``workers`` threads at most four
    batches ahead. The image decoders (Pillow, OpenCV, tifffile) and most of numpy release the GIL, and the
    decoded arrays are not pickled from a worker process to this one (as ``DataLoader`` workers must)."""
    n, ahead = len(decoder), 4 * batch_size
    pool = ThreadPoolExecutor(max(1, workers), thread_name_prefix="imganom-decode")
    pending: deque[Future] = deque()
    nxt, batch = 0, []
    try:
        while nxt < n or pending:
            while nxt < n and len(pending) < ahead:
                pending.append(pool.submit(decoder.__getitem__, nxt))
                nxt += 1
            batch.append(pending.popleft().result())  # Decoder never raises: a failure is an error row
            if len(batch) == batch_size or not pending:
                yield batch
                batch = []
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def exit_with_parent(parent_pid: int, _worker_id: int = 0) -> None:
    """DataLoader ``worker_init_fn``: the worker exits once ``parent_pid`` is gone (its parent changes), so
    a ``kill -9`` of ``imganom inspect`` leaves no decode worker behind, even one stuck on a full queue."""

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, name="imganom-parent-watch", daemon=True).start()


@dataclass
class InspectStats:
    total: int = 0
    done: int = 0
    ok: int = 0
    ng: int = 0
    error: int = 0
    skipped: int = 0
    scores: list[float] = field(default_factory=list)
    seconds: float = 0.0

    def count(self, score: float | None, is_anomalous: bool = False) -> None:
        """One more input done: an error when ``score`` is None, else OK or NG (the thresholded call)."""
        self.done += 1
        if score is None:
            self.error += 1
        else:
            self.ok += 1
            self.ng += bool(is_anomalous)
            self.scores.append(score)


def result_row(
    insp: Inspector, it: Item, res: Result | None, error: str | None, outputs: dict[str, str]
) -> dict:
    """The results.jsonl row of one item: its Result (``status`` ok) or its ``error`` (``status`` error)."""
    base = {
        "id": it.id,
        "path": printable(str(it.path)),
        "model_id": insp.model_id,
        "image_threshold": insp.image_threshold,
        "pixel_threshold": insp.pixel_threshold,
    }
    if res is None:
        return {
            **base,
            "status": "error",
            "verdict": None,
            "score": None,
            "norm_score": None,
            "n_regions": None,
            "max_region_area": None,
            "time_ms": None,
            "error": None if error is None else printable(error),
            "confidence": None,
            "regions": [],
            "outputs": {},
        }
    d = res.to_dict()
    return {
        **base,
        "status": "ok",
        "verdict": res.verdict,
        "score": res.score,
        "norm_score": None if np.isnan(res.norm_score) else res.norm_score,
        "n_regions": d["n_regions"],
        "max_region_area": d["max_region_area"],
        "time_ms": round(res.timing.get("total", 0.0), 3),
        "error": None,
        "confidence": d.get("confidence"),  # with uncertainty.samples >= 2 (ops.uncertainty)
        "regions": d["regions"],
        "outputs": outputs,
        "size": d["size"],
        **({"explanation": d["explanation"]} if "explanation" in d else {}),
        **(
            {"uncertainty": {"samples": insp.uncertainty, "score_spread": d["score_spread"],
                             "is_anomalous": d["is_anomalous"], "review_below": insp.review_below}}
            if "score_spread" in d else {}
        ),  # fmt: skip
    }


def predict_decoded(
    insp: Inspector,
    pairs: Sequence[tuple[Item, dict[str, Any]]],
    batch: list[Result] | Exception | None = None,
) -> list[Result | None]:
    """Inspect decoded items (``Decoder`` outputs) as one batch, then one by one if the batch fails.

    One entry per pair: its Result, or None where decoding or inspection failed (the reason is then in the
    pair's ``error``). ``batch``: the batch's outcome when the caller already ran it (``predict_stream``).
    """
    live = [k for k, (_, d) in enumerate(pairs) if d["error"] is None]
    args = [((pairs[k][0].id, pairs[k][1]["chw"], pairs[k][1]["meta"]), pairs[k][1]["ms"]) for k in live]

    def run(xs: list[tuple[tuple, float]]) -> list[Result]:
        return insp.predict_arrays([a for a, _ in xs], keep_image=True, decode_ms=[ms for _, ms in xs])

    results: list[Result | None] = [None] * len(pairs)
    for k, out in zip(live, batch_or_each(run, args, batch=batch) if live else []):
        if isinstance(out, Exception):  # e.g. out of memory even alone
            pairs[k][1]["error"] = f"{pairs[k][0].path}: inspection failed: {out}"
        else:
            results[k] = out
    return results


def run_inspect(
    insp: Inspector,
    inputs: Sequence[str | Path],
    out: str | Path,
    *,
    recursive: bool = True,
    batch_size: int = 16,
    workers: int = 2,
    resume: bool = False,
    options: OutputOptions | None = None,
    report: bool = True,
    on_progress: Callable[[InspectStats], None] | None = None,
    latents: bool = False,
    decode: str = "threads",
) -> tuple[list[dict], dict]:
    """Inspect all inputs into ``out``; returns (rows in input order, summary). ``latents``: each row gets
    its image's latent mean (``latent``) and ``out/latents.npy`` holds them all, one row per result row
    (NaN where there is none). ``decode``: decode on ``workers`` threads (``threaded_batches``; 2-core
    machine, onnxruntime, 256 px: 6-12 % less CPU per image than processes, docs/BENCHMARKS.md) or processes
    (``DataLoader``: for readers that hold the GIL); ``workers=0``: in the calling thread."""
    if decode not in DECODE_MODES:
        raise ValueError(f"decode must be one of {', '.join(DECODE_MODES)}, got {decode!r}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    options = options or OutputOptions()
    started = dt.datetime.now(dt.timezone.utc)
    t0 = time.perf_counter()
    items = outside(list_items(inputs, recursive=recursive), inputs, out)
    order = [it.id for it in items]
    st = InspectStats(total=len(items))
    with ResultsWriter(out, resume=resume) as writer:
        todo = [i for i, it in enumerate(items) if it.id not in writer.done_ids]
        st.skipped = len(items) - len(todo)
        st.done = st.skipped
        decoder = Decoder([items[i] for i in todo], insp)
        loader: Any = DataLoader(  # processes start only when it is iterated
            decoder,
            batch_size=batch_size,
            shuffle=False,
            num_workers=workers,
            collate_fn=_collate,
            prefetch_factor=4 if workers else None,
            persistent_workers=False,
            worker_init_fn=functools.partial(exit_with_parent, os.getpid()) if workers else None,
        )
        if decode == "threads" and workers:
            loader = threaded_batches(decoder, batch_size, workers)
        pending: deque[tuple[Item, Result | None, str | None, Future | None]] = deque()

        def drain(block: bool) -> None:
            while pending and (block or pending[0][3] is None or pending[0][3].done()):
                it, res, err, fut = pending.popleft()
                outputs = {}
                if fut is not None:
                    try:
                        outputs = fut.result()
                    except Exception as e:  # noqa: BLE001 - a failed write is recorded, not fatal
                        log.error("writing outputs for %s failed: %s", it.id, e)
                        res, err = None, f"{it.path}: writing outputs failed: {e}"
                row = result_row(insp, it, res, err, outputs)
                if latents and res is not None and res.latent is not None:
                    row["latent"] = res.latent.tolist()
                writer.write(row)
                st.count(None if res is None else res.score, res is not None and res.is_anomalous)
                if on_progress:
                    on_progress(st)

        def device_batches():  # decoded batches -> the inspector's device pipeline (one batch in flight)
            for batch in loader:
                pairs = [(items[todo[b["i"]]], b) for b in batch]
                ok = [(it.id, b["chw"], b["meta"]) for it, b in pairs if b["error"] is None]
                yield pairs, ok, [b["ms"] for _, b in pairs if b["error"] is None]

        with ThreadPoolExecutor(max_workers=2) as pool:
            stream = insp.predict_stream(device_batches(), keep_image=True, errors="return")
            for pairs, rs in stream:
                for (it, b), r in zip(pairs, predict_decoded(insp, pairs, rs)):
                    fut = None
                    if r is not None and r.anomaly_map is not None:  # Inspector(maps="ng"): NG images only
                        fut = pool.submit(write_outputs, out, r, options, insp)
                    pending.append((it, r, b["error"], fut))
                drain(block=len(pending) > 4 * batch_size)
            drain(block=True)
        return finish_run(insp, out, writer, order, st, (started, t0), report=report, latents=latents)


def finish_run(
    insp: Inspector,
    out: Path,
    writer: ResultsWriter,
    order: list[str],
    st: InspectStats,
    began: tuple[dt.datetime, float],
    *,
    report: bool,
    extra: dict | None = None,
    latents: bool = False,
) -> tuple[list[dict], dict]:
    """Rows in input order (``writer.finalize``), then summary.json (``extra`` keys added) and report.html.
    ``began``: the run's start (UTC time, ``perf_counter``); ``latents``: also latents.npy and the report's
    latent view. Shared by the local and the Ray engine."""
    rows = writer.finalize(order)
    if latents:
        write_latents(out / "latents.npy", rows)
    st.seconds = time.perf_counter() - began[1]
    summary = build_summary(insp, rows, st, began[0]) | (extra or {})
    write_json_atomic(out / "summary.json", summary)
    if report:
        from imganom.reporting.html import write_report

        write_report(out, rows, summary, latent_view=latent_view(insp, rows) if latents else None)
    return rows, summary


def latent_view(insp: Inspector, rows: list[dict]) -> dict:
    """The report's latent projection: the normals' 2-D points and each row's latent mean projected on the
    same PCA basis (``ops.latent``), or a ``note`` when the model has no latent statistics."""
    if not has_latent_stats(insp.stats):
        log.warning("the model has no latent statistics: no latent view (recalibrate it: imganom calibrate)")
        return {"note": "The model has no latent statistics (calibrated before they were recorded): "
                "recalibrate it (imganom calibrate) to see the latent space."}  # fmt: skip
    have = [r for r in rows if r.get("latent")]
    pts = project(np.asarray([r["latent"] for r in have]), insp.stats) if have else np.zeros((0, 2))
    return {"normals": insp.stats["latent_normals_2d"].cpu().double().tolist(),
            "points": {str(r["id"]): p for r, p in zip(have, pts.tolist())}}  # fmt: skip


def write_latents(path: Path, rows: list[dict]) -> None:
    """``latents.npy``: (rows, D) float32 latent means in row order, NaN for rows without one."""
    lat = [r.get("latent") for r in rows]
    dim = max((len(v) for v in lat if v), default=0)
    arr = np.full((len(rows), dim), np.nan, np.float32)
    for k, v in enumerate(lat):
        if v:
            arr[k] = v
    buf = io.BytesIO()
    np.save(buf, arr)
    atomic_write_bytes(path, buf.getvalue())


def write_outputs(
    out: Path, r: Result, options: OutputOptions, insp: Inspector | None = None
) -> dict[str, str]:
    """Write one result's mask, heatmap, overlay, preview (and raw map) under ``out``; frees ``r.image``.
    With ``insp``: the uncertainty map (when sampled, with heatmaps) and, with ``options.explain`` for images
    that get an overlay, the reconstruction and residual. Returns ``{kind: path relative to out}``."""
    vmax = heatmap_vmax(r.thresholds["image"], r.score)
    preview = to_uint8_preview(r.image)
    paths = write_item_outputs(
        out,
        r.id,
        preview,
        r.anomaly_map,
        r.mask,
        threshold=r.thresholds["pixel"] or vmax,
        vmax=vmax,
        score=r.norm_score if not np.isnan(r.norm_score) else r.score,
        verdict=r.verdict,
        options=options,
    )
    if insp is not None:
        explain = options.explain and options.overlay_for(r.verdict) and insp.model is not None
        recon = to_uint8_preview(insp.reconstruct(r.image)) if explain else None
        unc = r.uncertainty_map if options.heatmaps else None
        paths.update(write_trust_outputs(out, r.id, unc, preview if explain else None, recon))
    r.image = None  # free the decoded input early
    return paths


def build_summary(insp: Inspector, rows: list[dict], st: InspectStats, started: dt.datetime) -> dict:
    """Counts over all final rows (resumed ones included), score distribution, throughput, versions."""
    from imganom.formats.modelfile import library_versions

    scores = np.array([r["score"] for r in rows if r["status"] == "ok"], dtype=float)
    processed = st.done - st.skipped
    return {
        "counts": {
            "total": len(rows),
            "ok": sum(r["verdict"] == "OK" for r in rows),
            "ng": sum(r["verdict"] == "NG" for r in rows),
            "review": sum(r["verdict"] == "review" for r in rows),
            "error": sum(r["status"] == "error" for r in rows),
            "resumed": st.skipped,
        },
        "scores": (
            {
                "min": float(scores.min()),
                "max": float(scores.max()),
                "mean": float(scores.mean()),
                "p50": float(np.median(scores)),
                "p95": float(np.percentile(scores, 95)),
                "histogram": np.histogram(scores, bins=20)[0].tolist(),
                "bin_edges": np.histogram(scores, bins=20)[1].tolist(),
            }
            if scores.size
            else None
        ),
        "thresholds": {"image": insp.image_threshold, "pixel": insp.pixel_threshold},
        "model": {
            "id": insp.model_id,
            "name": insp.cfg.name,
            "size": list(insp.cfg.preprocess.size),
            "device": str(insp.device),
            "precision": precision_label(insp.amp),
            "backend": insp.backend_info,  # name, threads; what --backend auto measured
            "uncertainty_samples": insp.uncertainty,
        },
        "throughput_img_s": processed / st.seconds if st.seconds > 0 else None,
        "seconds": st.seconds,
        "versions": library_versions(),
        "started": started.isoformat(timespec="seconds"),
        "finished": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "torch_threads": torch.get_num_threads(),
    }
