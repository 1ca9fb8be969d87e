"""``imganom inspect --engine ray``: the same inspection on a Ray cluster (Ray Data), the same files out.

The driver expands the inputs exactly as the local engine does (``workflows.inspect.list_items``: folders,
lists, globs, volumes -> slices) into a Ray Dataset of item ids; it never decodes an image. ``map_batches``
runs an actor pool of ``InspectActor``s (one model load per actor; ``num_gpus`` per actor on a GPU cluster):
each decodes its batch, inspects it, writes masks/heatmaps/overlays under the shared output folder with the
local engine's names, and returns one row per item (unreadable files become error rows there). Rows stream
back to the driver, which appends them to ``results.jsonl`` as they come (so ``--resume`` works across
engines), drops an id it already has (a batch Ray re-ran after its actor died), and ends with the local
engine's ``finish_run`` (results.csv, summary.json, report.html) plus ``results.parquet`` written by Ray.

Actors that die (killed, out of memory) are restarted by Ray and their batches retried: Ray Data gives its
actor pools ``max_restarts=-1`` and ``max_task_retries=-1`` by default (passing them ourselves is deprecated
since Ray 2.60). A retried batch rewrites its outputs atomically under the same names, and its rows reach
the driver once. The flip side: an input that kills every actor that touches it (an image that runs the
node out of memory) is retried until someone stops the run; ``--resume`` then continues without it.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import math
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from imganom.inference.inspector import Inspector, load_inspector
from imganom.reporting.html import category
from imganom.reporting.results import CSV_COLUMNS, ResultsWriter
from imganom.reporting.writers import OutputOptions
from imganom.utils.files import to_jsonable
from imganom.workflows.inspect import (
    Decoder,
    InspectStats,
    Item,
    finish_run,
    list_items,
    outside,
    predict_decoded,
    result_row,
    write_outputs,
)

log = logging.getLogger(__name__)
EXTRA_HINT = "pip install 'imganom[ray]'"
CRASH_ONCE_ENV = "IMGANOM_RAY_CRASH_ONCE"  # test hook: a marker path; the first actor to claim it dies
FLOAT_COLUMNS = ("score", "norm_score", "image_threshold", "pixel_threshold", "time_ms")
INT_COLUMNS = ("n_regions", "max_region_area")


def import_ray() -> Any:
    """The ``ray`` module with Ray Data, or ImportError naming the ``[ray]`` extra."""
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as e:
        raise ImportError(f"--engine ray needs Ray Data ({EXTRA_HINT}): {e}") from e
    return ray


@dataclass(frozen=True)
class RayOptions:
    """Where and how wide to run. ``address``: None starts a local Ray instance for the run (or uses the one
    this process already joined), ``auto`` joins the cluster on this machine, ``ray://HOST:PORT`` a remote
    one. ``gpus_per_actor``: None = 1 when the cluster has GPUs, else 0 (CPU actors). ``remote_args``: more
    keywords for ``map_batches`` (e.g. ``runtime_env``, ``resources``, ``memory``)."""

    address: str | None = None
    actors: int = 1
    gpus_per_actor: float | None = None
    remote_args: dict[str, Any] = field(default_factory=dict)


def _crash_once_for_tests() -> None:
    """If ``$IMGANOM_RAY_CRASH_ONCE`` names a path nobody claimed yet: claim it and kill this actor process
    (after its batch's outputs are written, before its rows return), as an OOM kill would."""
    marker = os.environ.get(CRASH_ONCE_ENV)
    if not marker:
        return
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return
    os._exit(17)


def _encode_item(it: Item) -> str:
    """An item as ASCII JSON: file names that are not UTF-8 survive Arrow strings."""
    return json.dumps([os.fsdecode(it.path), it.id, it.slice])


def _decode_item(s: str) -> Item:
    path, item_id, sl = json.loads(s)
    return Item(Path(path), item_id, sl)


class InspectActor:
    """Ray Data class UDF: loads one Inspector per actor; a batch of encoded items -> rows as ASCII JSON,
    after writing the items' output files under ``out`` (the same names as the local engine)."""

    def __init__(self, model: str, load_kw: dict[str, Any], out: str, options: OutputOptions) -> None:
        self.insp = load_inspector(model, **load_kw)
        self.out, self.options = Path(out), options

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list[str]]:
        items = [_decode_item(s) for s in batch["item"]]
        decoder = Decoder(items, self.insp)
        pairs = [(it, decoder[k]) for k, it in enumerate(items)]
        rows = []
        for (it, d), r in zip(pairs, predict_decoded(self.insp, pairs)):
            outputs, err = {}, d["error"]
            if r is not None and r.anomaly_map is not None:
                try:
                    outputs = write_outputs(self.out, r, self.options)
                except Exception as e:  # noqa: BLE001 - a failed write is recorded, not fatal
                    r, err = None, f"{it.path}: writing outputs failed: {e}"
            rows.append(result_row(self.insp, it, r, err, outputs))
        _crash_once_for_tests()
        return {"row": [json.dumps(to_jsonable(r)) for r in rows]}


@contextmanager
def keep_signal_handlers() -> Iterator[None]:
    """Put this process's SIGTERM/SIGINT handlers back on exit: ``ray.init`` installs its own in the driver
    and ``ray.shutdown`` leaves them there (a caller's graceful-stop handler would be gone)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in saved.items():
            if handler is not None:
                signal.signal(sig, handler)


@contextmanager
def ray_session(address: str | None) -> Iterator[Any]:
    """The ``ray`` module, connected: to ``address``, or to a local instance started (and shut down) here;
    a process that already called ``ray.init`` keeps its connection."""
    ray = import_ray()
    if ray.is_initialized():
        yield ray
        return
    with keep_signal_handlers():
        ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING)
        try:
            yield ray
        finally:
            ray.shutdown()


def _count(st: InspectStats, row: dict) -> None:
    cat = category(row)  # a low-confidence "review" row counts under its thresholded call, as locally
    st.count(None if cat == "error" else row["score"], cat == "ng")


def _parquet_batch(batch: dict[str, np.ndarray]) -> Any:
    """results.jsonl lines -> an Arrow table with one fixed schema (the CSV columns typed; regions, outputs
    and size as JSON text), so every block of results.parquet agrees whatever its rows hold."""
    import pyarrow as pa

    rows = [json.loads(line) for line in batch["text"] if line.strip()]
    cols: dict[str, Any] = {}
    for c in CSV_COLUMNS:
        kind = pa.float64() if c in FLOAT_COLUMNS else pa.int64() if c in INT_COLUMNS else pa.string()
        cols[c] = pa.array([r.get(c) for r in rows], type=kind)
    for c in ("regions", "outputs", "size"):
        cols[c] = pa.array([json.dumps(r.get(c)) for r in rows], type=pa.string())
    return pa.table(cols)


def write_parquet(ray: Any, out: Path) -> Path:
    """``out/results.parquet`` (a folder of Parquet files, Ray's writer) from the final results.jsonl."""
    import shutil

    dest = out / "results.parquet"
    shutil.rmtree(dest, ignore_errors=True)
    ds = ray.data.read_text(str((out / "results.jsonl").resolve()))
    ds.map_batches(_parquet_batch, batch_format="numpy").write_parquet(str(dest.resolve()))
    return dest


def _dataset(ray: Any, todo: Sequence[Item], batch_size: int, actors: int) -> Any:
    records = [{"item": _encode_item(it)} for it in todo]
    blocks = max(1, min(math.ceil(len(records) / batch_size), max(1000, 4 * actors)))
    return ray.data.from_items(records, override_num_blocks=blocks)


def _actor_rows(
    ray: Any, todo: Sequence[Item], actor_kw: dict[str, Any], batch_size: int, engine: RayOptions, gpus: float
) -> Iterator[dict]:
    """The rows of ``todo`` as the actor pool returns them (all of a retried batch's may come again)."""
    ds = _dataset(ray, todo, batch_size, engine.actors).map_batches(
        InspectActor,
        fn_constructor_kwargs=actor_kw,
        batch_size=batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=engine.actors),
        num_cpus=1,
        num_gpus=gpus,
        **engine.remote_args,
    )
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        yield from (json.loads(line) for line in batch["row"])


def run_inspect_ray(
    insp: Inspector,
    model: str | Path,
    load_kw: dict[str, Any],
    inputs: Sequence[str | Path],
    out: str | Path,
    *,
    engine: RayOptions | None = None,
    recursive: bool = True,
    batch_size: int = 16,
    resume: bool = False,
    options: OutputOptions | None = None,
    report: bool = True,
    on_progress: Callable[[InspectStats], None] | None = None,
) -> tuple[list[dict], dict]:
    """Inspect all inputs into ``out`` on Ray; returns (rows in input order, summary) like ``run_inspect``.

    ``insp``: the driver's inspector (row metadata in the summary); ``model`` + ``load_kw``: what each actor
    passes to ``load_inspector`` (device, precision, thresholds, roi, backend, threads)."""
    engine = engine or RayOptions()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    began = (dt.datetime.now(dt.timezone.utc), time.perf_counter())
    items = outside(list_items(inputs, recursive=recursive), inputs, out)
    st = InspectStats(total=len(items))
    with ray_session(engine.address) as ray, ResultsWriter(out, resume=resume) as writer:
        todo = [it for it in items if it.id not in writer.done_ids]
        st.skipped = st.done = len(items) - len(todo)
        gpus = engine.gpus_per_actor
        if gpus is None:
            gpus = 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0
        kw = {**load_kw, "device": load_kw.get("device", "auto") if gpus > 0 else "cpu"}
        ctx = ray.data.DataContext.get_current()
        if on_progress is not None:  # the caller draws its own progress (with img/s): Ray's stays quiet
            ctx.enable_progress_bars = False
            logging.getLogger("ray.data").setLevel(logging.WARNING)
        actor_kw = {"model": str(model), "load_kw": kw, "out": str(out.resolve()),
                    "options": options or OutputOptions()}  # fmt: skip
        for row in _actor_rows(ray, todo, actor_kw, batch_size, engine, gpus) if todo else ():
            if row["id"] in writer.done_ids:  # a batch Ray re-ran: its rows are in already
                continue
            writer.write(row)
            _count(st, row)
            if on_progress:
                on_progress(st)
        extra = {"engine": {"name": "ray", "address": engine.address, "actors": engine.actors,
                            "gpus_per_actor": gpus, "actor_device": kw["device"]}}  # fmt: skip
        rows, summary = finish_run(insp, out, writer, [it.id for it in items], st, began, report=report,
                                   extra=extra)  # fmt: skip
        write_parquet(ray, out)
    return rows, summary
