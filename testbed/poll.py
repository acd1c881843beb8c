"""``wait_for``: the one way the tests, benchmarks and demo wait for something to happen.

Wait for the event itself (a file, a log line, a counter, a listener, a reconcile pass), never for a fixed
time: a sleep is either too long (slow tests) or too short on a loaded machine (a negative assertion that
passes for the wrong reason). On timeout ``wait_for`` fails loudly, naming what it waited for.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


class WaitTimeout(AssertionError):
    """What was waited for did not happen in time (an AssertionError, so a test fails with the message)."""


def wait_for(
    predicate: Callable[[], T],
    timeout: float = 10.0,
    what: str | Callable[[], str] = "condition",
    *,
    interval: float = 0.02,
    tolerate: tuple[type[BaseException], ...] = (),
) -> T:
    """Call ``predicate`` until it returns something truthy and return that.

    An exception of a type in ``tolerate`` counts as "not yet" (e.g. a socket that is not listening yet); any
    other exception propagates at once (e.g. a predicate raising because the process it waits on died).
    On timeout raises ``WaitTimeout`` naming ``what`` (a callable is called then: a log tail, the last state),
    the timeout, and the last value or tolerated exception."""
    deadline = time.monotonic() + timeout
    last: object = None
    while True:
        try:
            value = predicate()
        except tolerate as exc:
            last = exc
        else:
            if value:
                return value
            last = value
        if time.monotonic() >= deadline:
            described = what() if callable(what) else what
            shown = repr(last)
            shown = shown if len(shown) <= 300 else shown[:300] + "..."
            raise WaitTimeout(f"timed out after {timeout:g} s waiting for {described} (last: {shown})")
        time.sleep(interval)
