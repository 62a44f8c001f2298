"""One HTTP request's generation, seen from the event loop: a head's request or a team's run, as text deltas that
can be awaited, an outcome (text, finish reason, token counts) and a cancel that never blocks the loop.

Owns: the bridge between the workspace's blocking handles and asyncio (a head's `handle.stream()` is read on a
thread of its own and handed to the loop; a team run's answer is read by polling `run.outputs`), and what a team's
answer is (its output step's text; usage counts every step of the run). Knows nothing of HTTP or of the OpenAI
shapes; uses only the workspace's public API.
"""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass

TEAM_POLL_S = 0.01  # how often a team run's answer is read for new text


@dataclass
class Outcome:
    text: str
    finish_reason: str  # the engine's: stop, length, cancelled, error
    prompt_tokens: int
    completion_tokens: int


class Generation:
    """`async for delta in g.deltas(): ...`, then `g.outcome`; `g.cancel()` from anywhere, at any time."""

    outcome: Outcome | None = None

    async def deltas(self):
        raise NotImplementedError

    def cancel(self) -> None:
        raise NotImplementedError


class HeadGeneration(Generation):
    """A head's request; its stream is read on a thread and each delta handed to the event loop."""

    def __init__(self, ws, head: str, prompt_ids: list[int], sampling: dict):
        self.handle = ws.submit(head, prompt_ids, **sampling)  # MultiHeadError: refused before anything runs
        self.prompt_tokens = len(prompt_ids)
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue = asyncio.Queue()
        self._cancelled = False
        threading.Thread(target=self._read, name=f"multihead-http-{self.handle.id}", daemon=True).start()

    def _put(self, item) -> None:
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
        except RuntimeError:  # the loop is gone (server stopped): nobody is listening
            pass

    def _read(self) -> None:
        try:
            for delta in self.handle.stream():
                self._put(("delta", delta))
            c = self.handle.result()
            self._put(("end", Outcome(c.text, c.finish_reason, len(c.prompt_token_ids), len(c.token_ids))))
        except BaseException as e:  # noqa: BLE001 - handed to the request's coroutine, which raises it
            self._put(("error", e))

    async def deltas(self):
        while True:
            kind, value = await self._queue.get()
            if kind == "delta":
                yield value
            elif kind == "end":
                self.outcome = value
                return
            else:
                raise value

    def cancel(self) -> None:
        if not self._cancelled and not self.handle.done:
            self._cancelled = True
            self.handle.cancel(wait=False)  # the engine ends it (and frees its pages) before its next step


class TeamGeneration(Generation):
    """A team run; its answer is its output step's text (the last round), read as it grows."""

    def __init__(self, ws, team, variables: dict):
        self.team = team
        self.head = team.output_head
        self.run = team.start(**variables)  # TeamError: refused before anything runs
        stops = ws.heads[self.head].sampling.stop + tuple(team.steps[self.head].options.get("stop", ()))
        self._hold = max((len(s) - 1 for s in stops), default=0)  # text that may still become a stop string
        self._cancelled = False

    async def deltas(self):
        emitted = 0
        while True:
            done = self.run.done
            text = self.run.outputs.get(self.head, "")
            upto = len(text) if done else max(emitted, len(text) - self._hold)
            if upto > emitted:
                yield text[emitted:upto]
                emitted = upto
            if done:
                break
            await asyncio.sleep(TEAM_POLL_S)
        if self.run.error is not None:
            raise self.run.error
        tl = self.run.timeline()
        final = tl[tl["head"] == self.head].sort_values("round").iloc[-1]
        self.outcome = Outcome(text, str(final.finish_reason or "stop"), int(tl.prompt_tokens.sum()),
                               int(tl.output_tokens.sum()))

    def cancel(self) -> None:
        if not self._cancelled and not self.run.done:
            self._cancelled = True
            threading.Thread(target=self.run.cancel, daemon=True).start()
