"""``utils.batching.batch_or_each``: one batch when it works, each item alone when it does not."""

from __future__ import annotations

import pytest

from imganom.utils.batching import batch_or_each


def _square(calls: list[list[int]]):
    def run(xs: list[int]) -> list[int]:
        calls.append(list(xs))
        if any(x < 0 for x in xs):
            raise ValueError(f"negative: {xs}")
        return [x * x for x in xs]

    return run


def test_one_call_when_the_batch_works() -> None:
    calls: list[list[int]] = []
    assert batch_or_each(_square(calls), [1, 2, 3]) == [1, 4, 9]
    assert calls == [[1, 2, 3]]


def test_failing_batch_is_retried_item_by_item() -> None:
    calls: list[list[int]] = []
    out = batch_or_each(_square(calls), [1, -2, 3])
    assert out[0] == 1 and out[2] == 9 and isinstance(out[1], ValueError)
    assert calls == [[1, -2, 3], [1], [-2], [3]]


def test_a_known_outcome_is_not_run_again() -> None:
    calls: list[list[int]] = []
    assert batch_or_each(_square(calls), [1, 2], batch=[7, 8]) == [7, 8] and calls == []
    assert batch_or_each(_square(calls), [1, 2], batch=RuntimeError("oom")) == [1, 4]
    assert calls == [[1], [2]]


def test_other_exceptions_propagate() -> None:
    def run(xs: list[int]) -> list[int]:
        raise KeyError("bug")

    with pytest.raises(KeyError):
        batch_or_each(run, [1])
    assert isinstance(batch_or_each(run, [1], catch=(Exception,))[0], KeyError)
