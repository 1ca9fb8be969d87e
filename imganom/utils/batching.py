"""Batch first, then one at a time: one bad item must not take its batch neighbours down with it."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")


def batch_or_each(
    run: Callable[[list[T]], Sequence[R]],
    items: Sequence[T],
    *,
    catch: tuple[type[Exception], ...] = (RuntimeError, ValueError),
    batch: Sequence[R] | Exception | None = None,
) -> list[R | Exception]:
    """One outcome per item, in order: ``run(items)`` as one batch or, if that raised one of ``catch`` (e.g.
    out of memory, one undecodable image), ``run([item])`` for each item alone, with the exception in place of
    a result for the items that fail alone too.

    ``batch``: the batch's outcome when the caller already has it (its results or its exception, e.g. from
    ``Inspector.predict_stream(errors="return")``); ``run`` is then used only for the retries.
    """
    items = list(items)
    if batch is None:
        try:
            batch = run(items)
        except catch as e:
            batch = e
    if not isinstance(batch, Exception):
        return list(batch)
    out: list[R | Exception] = []
    for it in items:
        try:
            out.append(run([it])[0])
        except catch as e:
            out.append(e)
    return out
