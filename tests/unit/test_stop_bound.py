"""The stop bound every long-running process shares (bus/runtime.py)."""

from __future__ import annotations

import threading
import time

from bus.runtime import StopBound


def test_the_bound_ends_a_process_that_does_not_stop_by_itself() -> None:
    exits: list[int] = []
    ended = threading.Event()
    bound = StopBound(1.5, on_overdue=lambda code: (exits.append(code), ended.set()))
    started = time.monotonic()
    assert bound.request("SIGTERM")
    assert ended.wait(30)
    assert exits == [0]
    assert time.monotonic() - started < 1.5  # within the bound, not after it


def test_a_second_request_exits_at_once_and_a_clean_stop_cancels_the_watch() -> None:
    exits: list[int] = []
    bound = StopBound(30.0, on_overdue=exits.append)
    assert bound.request("SIGTERM") and bound.requested
    assert not bound.request("SIGINT")
    assert exits == [0]
    calm = StopBound(1.1, on_overdue=exits.append)
    calm.request("SIGTERM")
    calm.cancel()
    time.sleep(1.0)
    assert exits == [0]


def test_remaining_counts_down_from_the_request() -> None:
    bound = StopBound(10.0, on_overdue=lambda code: None)
    assert bound.remaining_s() == 9.0  # the whole bound (less its margin) while nothing is asked
    bound.request("SIGTERM")
    time.sleep(0.2)
    assert 8.0 < bound.remaining_s() < 8.9
    bound.cancel()
