"""The device fast path: keep the accelerator busy and bring back only what the host needs.

Pieces, each usable on its own and each degrading to plain synchronous code on the CPU:

* ``Prefetcher``: pinned host batches copied to the device on a side stream, one batch ahead (double
  buffering), with events so compute waits only for its own copy.
* ``pipelined``: issue the device work of batch k+1 before finishing batch k on the host; ``overlapped``:
  the same with the work on a thread, for the CPU backends.
* ``HostCopy``: device -> pinned host copies on a side stream; ``wait()`` gives numpy arrays.
* ``run_adaptive``: run a batch in chunks, halving the chunk on out-of-memory and remembering what fits.
* ``host_map``: host work after a device batch on a small thread pool.

Thresholding, morphology and scores on the device are ``ops.device_post`` / ``ops.head``; how the VAE itself
runs (fp32 output layer, ``torch.compile``) is ``inference.compiled``.
"""

from __future__ import annotations

import gc
import logging
import os
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

import numpy as np
import torch

log = logging.getLogger(__name__)
T = TypeVar("T")
R = TypeVar("R")
U = TypeVar("U")

# ---------------------------------------------------------------------------------------- out of memory


def is_oom(exc: BaseException) -> bool:
    """True for a device (or host allocator) out-of-memory error."""
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    msg = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in msg or "can't allocate memory" in msg)


def release_memory() -> None:
    """Drop garbage and hand cached device blocks back, so a retry starts from a clean allocator (nothing to
    do on the CPU, whose allocator returns freed memory by itself)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        gc.collect()
        torch.cuda.empty_cache()


class AdaptiveBatch:
    """The largest chunk known to fit (``limit``; None = no limit seen yet). It only shrinks: an OOM is rare
    and costly, so the working size is kept rather than probed upwards again."""

    def __init__(self, limit: int | None = None):
        self.limit = limit


def run_adaptive(
    fn: Callable[[list[T]], Sequence[R]],
    items: Sequence[T],
    batch_size: int,
    state: AdaptiveBatch | None = None,
) -> list[R]:
    """``fn`` over ``items`` in chunks of at most ``batch_size`` (and ``state.limit``); one result per item.

    On out-of-memory the chunk is halved and retried (with a warning) and the new size is remembered in
    ``state``; an OOM with a chunk of one, or any other error, propagates.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    state = state if state is not None else AdaptiveBatch()
    size = min(batch_size, state.limit or batch_size)
    out: list[R] = []
    i = 0
    while i < len(items):
        chunk = list(items[i : i + size])
        failed = None
        try:
            res = fn(chunk)
        except Exception as e:
            if len(chunk) == 1 or not is_oom(e):
                raise
            failed = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        if failed is None:
            if len(res) != len(chunk):
                raise RuntimeError(f"run_adaptive: fn returned {len(res)} results for {len(chunk)} items")
            out.extend(res)
            i += len(chunk)
            continue
        # outside the except block: the traceback (and the tensors its frames hold) is gone by now
        release_memory()
        size = max(1, len(chunk) // 2)
        state.limit = size
        log.warning("out of memory with a batch of %d; retrying with %d (%s)", len(chunk), size, failed)
    return out


# ------------------------------------------------------------------------------------ host <-> device


def _map_tensors(obj: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """Apply ``fn`` to every tensor in nested tuples / lists / dicts; anything else passes through."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, tuple):
        return tuple(_map_tensors(o, fn) for o in obj)
    if isinstance(obj, list):
        return [_map_tensors(o, fn) for o in obj]
    if isinstance(obj, dict):
        return {k: _map_tensors(v, fn) for k, v in obj.items()}
    return obj


class Prefetcher:
    """Iterate ``source`` with its tensors already on ``device``: batch k+1 is copied (pinned memory,
    ``non_blocking``, side stream) while the consumer computes on batch k.

    Each yielded item has the structure of the source item (tensors inside tuples/lists/dicts are moved;
    other values pass through). The consumer's current stream waits on the item's copy event, and the
    device tensors are marked as used by it, so the caching allocator never recycles them early. On the CPU
    (or another non-CUDA device) this is a plain iterator that calls ``.to(device)``. If a copy runs out of
    device memory the item is yielded with its host tensors (the consumer then copies in smaller pieces).
    An error raised by ``source`` surfaces only after the item before it has been yielded.
    """

    def __init__(self, source: Iterable[Any], device: torch.device | str):
        self.source = source
        self.device = torch.device(device)

    def _load(self, item: Any, stream: torch.cuda.Stream) -> tuple[Any, torch.cuda.Event | None]:
        def copy(t: torch.Tensor) -> torch.Tensor:
            if t.device.type != "cpu":
                return t.to(self.device, non_blocking=True)
            return (t if t.is_pinned() else t.pin_memory()).to(self.device, non_blocking=True)

        try:
            with torch.cuda.stream(stream):
                moved = _map_tensors(item, copy)
                event = torch.cuda.Event()
                event.record(stream)
        except torch.OutOfMemoryError:
            release_memory()
            log.warning("out of memory copying a batch to %s; it is copied in pieces instead", self.device)
            return item, None
        return moved, event

    def _ready(self, loaded: tuple[Any, torch.cuda.Event | None]) -> Any:
        item, event = loaded
        if event is not None:
            cur = torch.cuda.current_stream(self.device)
            cur.wait_event(event)
            _map_tensors(item, lambda t: (t.record_stream(cur), t)[1] if t.is_cuda else t)
        return item

    def __iter__(self) -> Iterator[Any]:
        it = iter(self.source)
        if self.device.type != "cuda":
            for item in it:
                yield _map_tensors(item, lambda t: t.to(self.device))
            return
        stream = torch.cuda.Stream(self.device)
        try:
            nxt = self._load(next(it), stream)
        except StopIteration:
            return
        while True:
            cur = nxt
            try:
                nxt = self._load(next(it), stream)
            except StopIteration:
                yield self._ready(cur)
                return
            except Exception:
                yield self._ready(cur)
                raise
            yield self._ready(cur)


def pipelined(
    source: Iterable[T], launch: Callable[[T], U], collect: Callable[[U], R], depth: int = 1
) -> Iterator[R]:
    """``collect(launch(item))`` for every item, in order, with ``launch`` of the next ``depth`` items issued
    before ``collect`` of the current one: asynchronous device work of batch k+1 is queued while the host
    finishes batch k. ``depth=0`` is the plain sequential loop. An error from ``source`` or ``launch``
    is raised after the already launched items have been collected and yielded."""
    pending: deque[U] = deque()
    it = iter(source)
    while True:
        try:
            item = next(it)
        except StopIteration:
            break
        except Exception:
            while pending:
                yield collect(pending.popleft())
            raise
        try:
            launched = launch(item)
        except Exception:
            while pending:
                yield collect(pending.popleft())
            raise
        pending.append(launched)
        while len(pending) > depth:
            yield collect(pending.popleft())
    while pending:
        yield collect(pending.popleft())


def overlapped(
    source: Iterable[T], launch: Callable[[T], U], collect: Callable[[U], R], depth: int = 1
) -> Iterator[R]:
    """``pipelined`` with ``launch`` on a worker thread: the CPU backends (torch, onnxruntime, OpenVINO all
    release the GIL while they compute) run batch k+1 while the calling thread finishes batch k and whatever
    its consumer does with the results (post-processing, writing outputs). Same order, same errors (an error
    of ``launch`` is raised where its item is collected). The first item runs on the calling thread and the
    thread starts with the second, so a one-batch stream (``Inspector.predict``) pays no thread start-up
    (1-1.5 ms measured, a third of a small model's batch-1 latency)."""
    pool: ThreadPoolExecutor | None = None

    def start(item: T) -> Future:
        nonlocal pool
        if pool is None:
            pool = ThreadPoolExecutor(1, thread_name_prefix="imganom-model")
            done: Future = Future()
            try:
                done.set_result(launch(item))
            except Exception as e:  # noqa: BLE001 - raised where the item is collected, as for the others
                done.set_exception(e)
            return done
        return pool.submit(launch, item)

    try:
        yield from pipelined(source, start, lambda f: collect(f.result()), depth)
    finally:
        if pool is not None:
            pool.shutdown(wait=True)


class HostCopy:
    """Device tensors on their way into pinned host memory; ``wait()`` returns them as numpy arrays.

    On CUDA the copies run on ``stream`` (a side stream by default) after the work already queued on the
    current stream, so they overlap with whatever is queued next; only ``wait()`` blocks the host.
    """

    def __init__(self, tensors: Sequence[torch.Tensor], stream: torch.cuda.Stream | None = None):
        self._event: torch.cuda.Event | None = None
        cuda = [t for t in tensors if t.is_cuda]
        if not cuda:
            self._host = [t.detach().cpu() for t in tensors]
            return
        dev = cuda[0].device
        stream = stream or torch.cuda.Stream(dev)
        stream.wait_stream(torch.cuda.current_stream(dev))
        self._host = []
        with torch.cuda.stream(stream):
            for t in tensors:
                if not t.is_cuda:
                    self._host.append(t.detach())
                    continue
                h = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
                h.copy_(t.detach(), non_blocking=True)
                t.record_stream(stream)
                self._host.append(h)
            self._event = torch.cuda.Event()
            self._event.record(stream)

    def wait(self) -> list[np.ndarray]:
        """Block until the copies are done; pinned buffers are copied out into ordinary memory (results may
        live long, page-locked memory should not), host tensors given as such are returned without a copy."""
        if self._event is not None:
            self._event.synchronize()
            self._event = None
            return [h.numpy().copy() if h.is_pinned() else h.numpy() for h in self._host]
        return [h.numpy() for h in self._host]


_POOL: ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()


def host_map(fn: Callable[[T], R], items: Sequence[T]) -> list[R]:
    """``[fn(i) for i in items]`` on a small shared thread pool (OpenCV and most numpy release the GIL), so
    host work after a device batch (regions of each image) does not become the bottleneck."""
    global _POOL
    if len(items) < 2:
        return [fn(i) for i in items]
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = ThreadPoolExecutor(min(8, os.cpu_count() or 1), thread_name_prefix="imganom-host")
    return list(_POOL.map(fn, items))
