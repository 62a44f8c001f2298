"""Holding Ctrl-C back while the engine changes shared state, so an interrupt never leaves it half-changed.

Owns `interrupts_deferred()`: on the main thread, a SIGINT that arrives inside the block is remembered and raised
as `KeyboardInterrupt` when the block ends; elsewhere (the engine thread, which never receives SIGINT) it does
nothing. Knows nothing of what the block does.
"""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager


@contextmanager
def interrupts_deferred():
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    try:
        old = signal.signal(signal.SIGINT, lambda signum, frame: pending.append(signum))
    except (ValueError, TypeError):  # not the main interpreter, or a handler Python cannot restore
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old if old is not None else signal.default_int_handler)
        if pending:
            raise KeyboardInterrupt
