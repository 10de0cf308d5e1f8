"""Polling until something holds: the one wait loop every test helper uses.

The timeout is a safety net against hangs, never a timing assertion.
"""
import time
from collections.abc import Callable
from typing import Any


def wait_until(predicate: Callable[[], Any], timeout: float = 10, interval: float = 0.05, what: str = "",
               details: Callable[[], str] | None = None) -> Any:
    """Poll `predicate` until it returns something true and return that; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            message = f"timed out after {timeout}s waiting for {what or predicate}"
            raise AssertionError(message + (f"\n{details()}" if details else ""))
        time.sleep(interval)
