"""Stream sources: models whose tokens arrive from elsewhere (a remote engine) instead of a forward of their own.

A runner with `streams = True` is one. Its requests never enter the scheduler (they hold no pages and take no
part in a batch); the engine hands each to it when it is admitted (`start(req, wake)`), asks it every step what
arrived (`poll() -> [Arrival]`: the request, its new tokens as (id, `time.perf_counter()` of arrival), and its end:
a finish reason or an error), and tells it when a request ends for any reason (`stop(req)`). A source calls
`wake()` when something arrives, so an idle engine steps at once. Its tokens go through the same path as sampled
ones (text, stops, max_tokens, the token frame with their arrival times, the bus, the request's stream); a source
may give a request its own detokenizer in `start` (`req.detokenizer`, with `push(token_id) -> text`).

Owns the engine's side of that protocol. Knows nothing of HTTP, heads or what a source runs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .request import Status

if TYPE_CHECKING:
    from .engine import Engine


def is_source(slot) -> bool:
    return slot is not None and getattr(slot.runner, "streams", False) is True


def start(engine: "Engine", req) -> bool:
    """Hand `req` to its model's source; False when its model is not one (the scheduler takes it)."""
    slot = engine.models.get(req.model)
    if not is_source(slot):
        return False
    req.status = Status.RUNNING
    slot.runner.start(req, engine.wake)
    return True


def stop(engine: "Engine", req) -> None:
    slot = engine.models.get(req.model)
    if is_source(slot):
        slot.runner.stop(req)


def poll(engine: "Engine") -> int:
    """Append every source's arrived tokens to their requests and end the requests whose stream ended; returns
    how many tokens arrived."""
    n = 0
    for model, slot in list(engine.models.items()):
        if not is_source(slot):
            continue
        try:
            arrivals = slot.runner.poll()
        except Exception as e:  # a bug in a source: its requests fail, the engine goes on
            engine._record_error(f"the stream source of {model!r}", e)
            for req in [r for r in engine.live_requests() if r.model == model]:
                engine.fail(req, f"the stream source of {model!r} failed: {type(e).__name__}: {e}", e)
            continue
        for arrival in arrivals:
            req = arrival.request
            for tok, t in arrival.tokens:
                if req.status.done:
                    break
                engine._append_token(req, tok, t - engine.epoch, batch_size=0)
                n += 1
            if req.status.done:
                continue
            if arrival.error is not None:
                engine.fail(req, str(arrival.error), arrival.error)
            elif arrival.finish_reason is not None:
                engine.finalize(req, Status.FINISHED, arrival.finish_reason)
    return n
