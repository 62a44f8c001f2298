"""The bus: named topics carrying text, JSON and token-id messages between heads and code.

Owns: topics, the message log, subscriptions (callbacks, queues, iterators, async iterators). Every head's
output is published on the topic named after the head, one message per token (kind "tokens", with its text
delta) and a final "end" message with the finish reason. Knows nothing of models or scheduling: the workspace
forwards engine events to `on_engine_event`.
"""

from __future__ import annotations

import asyncio
import json
import queue
import threading
import time
import warnings
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable

import pandas as pd

KINDS = ("text", "json", "tokens", "end")
MESSAGE_COLUMNS = ["seq", "topic", "sender", "kind", "payload", "text", "t", "request", "finish_reason"]


@dataclass(frozen=True)
class Message:
    seq: int  # bus-wide order
    topic: str
    sender: str | None
    kind: str  # text | json | tokens | end
    payload: Any  # str, parsed JSON, list of token ids, or None for "end"
    text: str  # the text of the message (the delta for "tokens"; the JSON source for "json")
    t: float  # seconds since the workspace started
    request: int | None = None
    finish_reason: str | None = None


class Subscription:
    """Messages of one topic ("*" for all) from the time of subscribing: iterate, `get()`, or `async for`."""

    def __init__(self, bus: "Bus", topic: str, callback: Callable[[Message], None] | None):
        self.bus, self.topic, self.callback = bus, topic, callback
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self.closed = False

    def _deliver(self, msg: Message) -> None:
        if self.callback is None:
            self._queue.put(msg)
            return
        try:
            self.callback(msg)
        except Exception as e:  # a subscriber's bug must not stop the engine that publishes
            self.bus.errors.append((msg, e))
            warnings.warn(f"bus subscriber of {self.topic!r} raised {type(e).__name__}: {e}", stacklevel=2)

    def get(self, timeout: float | None = None) -> Message:
        """The next message; raises `queue.Empty` after `timeout` seconds, `StopIteration` once closed and drained."""
        msg = self._queue.get(timeout=timeout)
        if msg is None:
            raise StopIteration
        return msg

    def __iter__(self):
        while True:
            msg = self._queue.get()
            if msg is None:
                return
            yield msg

    async def __aiter__(self):
        loop = asyncio.get_running_loop()
        while True:
            msg = await loop.run_in_executor(None, self._queue.get)
            if msg is None:
                return
            yield msg

    def close(self) -> None:
        """Unsubscribe: no more messages are delivered; an iterator ends after what it already holds."""
        if not self.closed:
            self.closed = True
            self.bus._unsubscribe(self)
            self._queue.put(None)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class Bus:
    """Topics and their subscribers; the log keeps the newest `max_messages` messages (`dropped` counts the rest)."""

    def __init__(self, epoch: float | None = None, max_messages: int = 200_000):
        self.epoch = time.perf_counter() if epoch is None else epoch
        self._subs: dict[str, list[Subscription]] = {}
        self._log: deque[Message] = deque(maxlen=max_messages)
        self._seq = 0
        self.dropped = 0
        self._lock = threading.RLock()
        self.errors: list[tuple[Message, Exception]] = []  # exceptions raised by subscriber callbacks

    def subscribe(self, topic: str, callback: Callable[[Message], None] | None = None) -> Subscription:
        if not isinstance(topic, str) or not topic:
            raise ValueError(f"a topic is a non-empty string, got {topic!r}")
        sub = Subscription(self, topic, callback)
        with self._lock:
            self._subs.setdefault(topic, []).append(sub)
        return sub

    def _unsubscribe(self, sub: Subscription) -> None:
        with self._lock:
            subs = self._subs.get(sub.topic, [])
            if sub in subs:
                subs.remove(sub)

    def publish(
        self, topic: str, payload: Any, *, kind: str | None = None, sender: str | None = None,
        text: str | None = None, request: int | None = None, finish_reason: str | None = None,
    ) -> Message:
        """Publish a message. Kind is inferred: str → text, list of ints → tokens, dict/list → json."""
        if kind is None:
            if isinstance(payload, str):
                kind = "text"
            elif isinstance(payload, (list, tuple)) and all(isinstance(x, int) for x in payload) and payload:
                kind = "tokens"
            else:
                kind = "json"
        if kind not in KINDS:
            raise ValueError(f"message kind must be one of {KINDS}, got {kind!r}")
        if kind == "json" and text is None:
            try:
                text = json.dumps(payload)
            except TypeError as e:
                raise ValueError(f"a JSON message needs a JSON-serializable payload: {e}") from None
        if text is None:
            text = payload if isinstance(payload, str) else ""
        with self._lock:
            msg = Message(self._seq, topic, sender, kind, payload, text, time.perf_counter() - self.epoch,
                          request, finish_reason)
            self._seq += 1
            if len(self._log) == self._log.maxlen:
                self.dropped += 1
            self._log.append(msg)
            subs = list(self._subs.get(topic, ())) + list(self._subs.get("*", ()))
            for sub in subs:
                sub._deliver(msg)
        return msg

    def on_engine_event(self, event: str, req, row) -> None:
        """Publish a head's token (its `TokenRow`: id and text delta) or its end on the topic named after the head."""
        if event == "token":
            self.publish(req.head, [row.token_id], kind="tokens", sender=req.head, text=row.text, request=req.id)
        elif event == "finish":
            self.publish(req.head, None, kind="end", sender=req.head, text=req.text, request=req.id,
                         finish_reason=req.finish_reason)

    def clear_log(self) -> None:
        """Forget the logged messages (subscribers are unaffected)."""
        with self._lock:
            self._log.clear()

    def messages(self, topic: str | None = None) -> pd.DataFrame:
        """The log as a frame (columns: seq, topic, sender, kind, payload, text, t, request, finish_reason)."""
        with self._lock:
            log = [m for m in self._log if topic is None or m.topic == topic]
        return pd.DataFrame([tuple(getattr(m, c) for c in MESSAGE_COLUMNS) for m in log], columns=MESSAGE_COLUMNS)

