"""The answers to generation requests: one JSON response (waiting for the end while watching that the client is
still there), or server-sent events as the text arrives; either way a generation whose client goes away is
cancelled, and an error is OpenAI's error JSON.

Owns: the order and shape of the stream's events (the assistant role first, text deltas, the finish reason, the
usage chunk when asked for, `[DONE]`; an error mid-stream as an `{"error": ...}` event) and the disconnect checks.
Knows nothing of heads or teams: it reads a `Generation`.
"""

from __future__ import annotations

import asyncio
import json
import uuid

from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse

from ..errors import MultiHeadError
from . import protocol as P
from .generations import Generation

DISCONNECT_POLL_S = 0.25  # how often a non-streamed request checks that its client is still there


def error(e: P.APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _usage(o) -> dict:
    return P.usage(o.prompt_tokens, o.completion_tokens)


async def respond(request: Request, req: P.GenerationRequest, gen: Generation, *, chat: bool):
    rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
    created = P.now()
    if req.stream:
        return StreamingResponse(_stream(req, gen, rid, created, chat), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    task = None
    loop = asyncio.get_running_loop()
    checked = loop.time()
    try:
        it = gen.deltas().__aiter__()
        while True:
            task = task or asyncio.ensure_future(it.__anext__())
            done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
            # every DISCONNECT_POLL_S (a wait that timed out took that long), whether or not text arrived meanwhile:
            # a model streaming text steadily never left the wait idle, and its abandoned request ran to its end
            if loop.time() - checked >= DISCONNECT_POLL_S:
                checked = loop.time()
                if await request.is_disconnected():
                    if done:
                        task.exception()  # the delta or the end that came meanwhile is not wanted: read, not logged
                    return error(P.APIError(499, "the client closed the request", code="client_closed"))
            if not done:
                continue
            try:
                task.result()
            except StopAsyncIteration:
                break
            task = None
    except MultiHeadError as e:
        raise P.APIError(500, f"{req.model}: {e}") from None
    finally:
        if task is not None and not task.done():
            task.cancel()
        if gen.outcome is None:
            gen.cancel()  # the client went away (or an error): stop the request and free its pages
    o = gen.outcome
    reason = P.finish_reason(o.finish_reason)
    if chat:
        return JSONResponse(P.chat_response(rid, req.model, o.text, reason, _usage(o), created))
    return JSONResponse(P.completion_response(rid, req.model, o.text, reason, _usage(o), created))


async def _stream(req: P.GenerationRequest, gen: Generation, rid: str, created: int, chat: bool):
    """Server-sent events; a client that goes away cancels the generation (Starlette cancels this coroutine)."""
    model, with_usage = req.model, req.include_usage

    def piece(text: str | None, finish: str | None = None, delta: dict | None = None) -> str:
        if chat:
            d = delta if delta is not None else ({} if text is None else {"content": text})
            return _sse(P.chat_chunk(rid, model, created, d, finish, None, with_usage))
        return _sse(P.completion_response(rid, model, text or "", finish, None, created, chunk=True,
                                          with_usage=with_usage))

    try:
        if chat:
            yield piece(None, delta={"role": "assistant", "content": ""})
        try:
            async for delta in gen.deltas():
                yield piece(delta)
        except MultiHeadError as e:
            yield _sse(P.APIError(500, f"{model}: {e}").body())
            return
        o = gen.outcome
        yield piece(None, P.finish_reason(o.finish_reason))
        if with_usage:
            if chat:
                yield _sse(P.chat_chunk(rid, model, created, None, use=_usage(o), with_usage=True))
            else:
                yield _sse(P.completion_response(rid, model, None, None, _usage(o), created, chunk=True))
        yield "data: [DONE]\n\n"
    finally:
        if gen.outcome is None:
            gen.cancel()  # the client went away (or an error): stop the request and free its pages
