"""``serve.batcher.MicroBatcher``: grouping, the batch size cap, per-item failure isolation, skipped timed-out
jobs and draining on close; driven by a real event loop with a plain function as the device work."""

from __future__ import annotations

import asyncio
import threading

import pytest

from imganom.serve.batcher import MicroBatcher


class Device:
    """Records the batches it is given; doubles numbers and refuses negative ones."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.threads: set[str] = set()

    def __call__(self, items: list[int]) -> list[int]:
        self.batches.append(list(items))
        self.threads.add(threading.current_thread().name)
        if any(x < 0 for x in items):
            raise ValueError(f"negative input in {items}")
        return [2 * x for x in items]


def _run(coro_fn) -> None:
    asyncio.run(coro_fn())


def test_concurrent_items_share_a_batch_and_keep_their_results() -> None:
    dev, sizes = Device(), []

    async def main() -> None:
        b = MicroBatcher(dev, max_batch=8, max_wait_s=0.2, max_queue=32, on_batch=sizes.append)
        b.start()
        futs = [b.submit(x) for x in range(5)]
        assert await asyncio.gather(*futs) == [0, 2, 4, 6, 8]
        await b.close(5)

    _run(main)
    assert dev.batches == [[0, 1, 2, 3, 4]] and sizes == [5]
    assert all(t.startswith("imganom-device") for t in dev.threads)


def test_batches_are_capped_at_max_batch() -> None:
    dev = Device()

    async def main() -> None:
        b = MicroBatcher(dev, max_batch=3, max_wait_s=0.05, max_queue=32)
        b.start()
        assert await asyncio.gather(*[b.submit(x) for x in range(7)]) == [2 * x for x in range(7)]
        await b.close(5)

    _run(main)
    assert [len(x) for x in dev.batches] == [3, 3, 1]


def test_one_bad_item_fails_only_its_own_request() -> None:
    dev = Device()

    async def main() -> None:
        b = MicroBatcher(dev, max_batch=8, max_wait_s=0.1, max_queue=32)
        b.start()
        futs = [b.submit(x) for x in (1, -1, 3)]
        out = await asyncio.gather(*futs, return_exceptions=True)
        assert out[0] == 2 and out[2] == 6
        assert isinstance(out[1], ValueError) and "[-1]" in str(out[1])
        await b.close(5)

    _run(main)
    assert dev.batches == [[1, -1, 3], [1], [-1], [3]]  # the batch, then each item alone


def test_full_queue_refuses_and_cancelled_jobs_are_skipped() -> None:
    dev = Device()

    async def main() -> None:
        b = MicroBatcher(dev, max_batch=4, max_wait_s=0.0, max_queue=2)  # not started: nothing drains
        keep, dropped = b.submit(10), b.submit(20)
        with pytest.raises(asyncio.QueueFull):
            b.submit(30)
        dropped.cancel()  # e.g. its request timed out while waiting
        b.start()
        assert await keep == 20
        await b.close(5)

    _run(main)
    assert dev.batches == [[10]]


def test_close_drains_what_is_queued() -> None:
    dev = Device()

    async def main() -> None:
        b = MicroBatcher(dev, max_batch=2, max_wait_s=1.0, max_queue=16)
        futs = [b.submit(x) for x in range(5)]
        b.start()
        await b.close(5)  # the close sentinel queues behind the five jobs
        assert [f.result() for f in futs] == [0, 2, 4, 6, 8]

    _run(main)
    assert sum(len(x) for x in dev.batches) == 5
