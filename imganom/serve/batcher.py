"""Micro-batching: requests queue their decoded images; one task groups them into device batches."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from imganom.utils.batching import batch_or_each

log = logging.getLogger(__name__)


@dataclass
class Job:
    """One queued item and the future its request awaits."""

    item: Any
    future: asyncio.Future


class MicroBatcher:
    """Bounded queue + one task that groups queued items into device batches run on a single thread.

    ``run(items)`` returns one result per item; a batch that raises is retried item by item, so one bad item
    fails only its own request. ``submit`` raises ``asyncio.QueueFull`` when the queue is full. ``close`` lets
    everything already queued finish before the task exits. A job whose future was cancelled (request timed
    out) is skipped.
    """

    def __init__(
        self,
        run: Callable[[list], Sequence],
        max_batch: int,
        max_wait_s: float,
        max_queue: int,
        on_batch: Callable[[int], None] = lambda n: None,
    ):
        self._run, self.max_batch, self.max_wait_s, self._on_batch = run, max_batch, max_wait_s, on_batch
        self.queue: asyncio.Queue[Job | None] = asyncio.Queue(max_queue)
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="imganom-device")
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="imganom-batcher")

    def submit(self, item: Any) -> asyncio.Future:
        fut = asyncio.get_running_loop().create_future()
        self.queue.put_nowait(Job(item, fut))
        return fut

    async def close(self, timeout: float) -> None:
        """Drain the queue (new submissions must already have stopped), then stop the task and thread."""
        if self._task is not None and not self._task.done():
            await self.queue.put(None)
            try:
                await asyncio.wait_for(self._task, timeout)
            except asyncio.TimeoutError:
                log.error("batcher did not drain within %.1fs; cancelling", timeout)
        self.executor.shutdown(wait=False, cancel_futures=True)

    async def _next_batch(self) -> tuple[list[Job], bool]:
        """Up to ``max_batch`` jobs: the first waits indefinitely, the rest at most ``max_wait_s`` after it.
        The flag is True when the close sentinel was met (the batch may still hold jobs)."""
        loop = asyncio.get_running_loop()
        job = await self.queue.get()
        if job is None:
            return [], True
        batch = [job]
        deadline = loop.time() + self.max_wait_s
        while len(batch) < self.max_batch:
            try:
                nxt = self.queue.get_nowait()
            except asyncio.QueueEmpty:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    nxt = await asyncio.wait_for(self.queue.get(), remaining)
                except asyncio.TimeoutError:
                    break
            if nxt is None:
                return batch, True
            batch.append(nxt)
        return batch, False

    async def _loop(self) -> None:
        while True:
            batch, stop = await self._next_batch()
            try:
                await self._process(batch)
            except Exception as e:  # never let one batch end the loop (every later request would time out)
                log.exception("batch failed")
                for j in batch:
                    if not j.future.done():
                        j.future.set_exception(e)
            if stop:
                return

    async def _process(self, batch: list[Job]) -> None:
        live = [j for j in batch if not j.future.done()]
        if not live:
            return
        self._on_batch(len(live))
        items = [j.item for j in live]
        outcomes = await asyncio.get_running_loop().run_in_executor(
            self.executor, lambda: batch_or_each(self._run, items, catch=(Exception,))
        )
        for j, out in zip(live, outcomes):
            if j.future.done():
                continue
            if isinstance(out, Exception):
                j.future.set_exception(out)
            else:
                j.future.set_result(out)
