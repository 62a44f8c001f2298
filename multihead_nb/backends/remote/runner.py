"""The runner of a remote model: a stream source (the engine's hook for models whose tokens come from elsewhere).

Owns: one streamed chat completion per request, each read on a thread of its own (started once the request's
prompt is closed: a team's handoff into a remote head streams its prompt in first), the pieces that arrived with
their arrival times, the end or the error of each stream, and stopping streams (cancel, the head removed, the
model unloaded). Knows nothing of pages (a remote model has none: `NoPages`), heads, the scheduler or the recorder:
the engine polls it every step (`engine/sources.py` describes the protocol) and wakes when a piece arrives.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass, field

import torch

from .client import ChatStream, RemoteConfig, RemoteError, request_body
from .codec import RemoteCodec


@dataclass(frozen=True)
class NoPages:
    """The scheduler's view of a remote model's K/V: none (its requests never take a page)."""

    tokens_per_page: int = 1 << 30
    bytes_per_page: int = 0

    def pages_for(self, num_tokens: int) -> int:
        return 0


@dataclass
class Arrival:
    """What one request received since the last poll: pieces as (token id, perf_counter time), and its end."""

    request: object
    tokens: list = field(default_factory=list)
    finish_reason: str | None = None
    error: BaseException | None = None


class _Live:
    def __init__(self, req, wake):
        self.req, self.wake = req, wake
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()  # ("piece", text, t) | ("end", reason) | ("error", e)
        self.stream: ChatStream | None = None


class RemoteRunner:
    """Serves a remote model's requests as streams (`streams = True`: the engine starts, polls and stops them)."""

    streams = True
    layout = NoPages()
    device = torch.device("cpu")

    def __init__(self, config: RemoteConfig, codec: RemoteCodec):
        self.config, self.codec = config, codec
        self._live: dict[int, _Live] = {}
        self._lock = threading.Lock()

    def weight_nbytes(self) -> int:
        return 0

    def forward(self, batch):
        raise RuntimeError(f"{self.config.where} is served by streams, not forwards")

    # ---- the stream-source protocol (engine thread) -------------------------------------------------------
    def start(self, req, wake) -> None:
        """Take `req` (its stream opens once its prompt is closed); `wake()` tells the engine a piece arrived."""
        req.detokenizer = self.codec.detokenizer()  # pieces are whole text: emitted as they are
        with self._lock:
            self._live[req.id] = _Live(req, wake)

    def poll(self) -> list[Arrival]:
        """Open the streams of prompts that closed; what arrived for each request since the last poll."""
        out = []
        with self._lock:
            live = list(self._live.values())
        for item in live:
            if item.stream is None:
                if item.req.prompt_open:
                    continue
                self._open(item)
            arrival = Arrival(item.req)
            while True:
                try:
                    kind, *value = item.inbox.get_nowait()
                except queue.Empty:
                    break
                if kind == "piece":
                    arrival.tokens.append((self.codec.piece_id(value[0]), value[1]))
                elif kind == "end":
                    arrival.finish_reason = value[0]
                else:
                    arrival.error = value[0]
            if arrival.tokens or arrival.finish_reason or arrival.error:
                out.append(arrival)
            if arrival.finish_reason or arrival.error:
                with self._lock:
                    self._live.pop(item.req.id, None)
        return out

    def stop(self, req) -> None:
        """Forget `req` and close its stream (it ended: finished, cancelled or failed)."""
        with self._lock:
            item = self._live.pop(req.id, None)
        if item is not None and item.stream is not None:
            item.stream.cancel()

    def close(self) -> None:
        with self._lock:
            items, self._live = list(self._live.values()), {}
        for item in items:
            if item.stream is not None:
                item.stream.cancel()

    # ---- one stream ---------------------------------------------------------------------------------------
    def _open(self, item: _Live) -> None:
        req = item.req
        body = request_body(self.config.model, self.codec.messages(req.prompt_ids), req.params)
        item.stream = ChatStream(self.config, body)
        threading.Thread(target=self._read, args=(item,), name=f"multihead-remote-{req.id}", daemon=True).start()

    def _read(self, item: _Live) -> None:
        stream = item.stream
        try:
            for text, t in stream:
                item.inbox.put(("piece", text, t))
                item.wake()
            if not stream.cancelled:
                item.inbox.put(("end", stream.finish_reason or "stop"))
        except RemoteError as e:
            item.inbox.put(("error", e))
        except Exception as e:  # noqa: BLE001 - a bug in reading: the request fails with it, the engine goes on
            item.inbox.put(("error", RemoteError(f"{self.config.where}: reading the stream failed: "
                                                 f"{type(e).__name__}: {e}")))
        item.wake()
