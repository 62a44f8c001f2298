"""Building requests for heads and changing open (streamed) prompts.

Owns: request ids and per-request seeds (from the workspace's seed), the checks a prompt must pass before the
engine sees it (token ids in the vocabulary, not empty, within the model's context and the head's pages), and the
two changes an open prompt accepts, applied on the engine's side before the next step: `extend` (the one way it
grows) and `truncate` (re-tokenized upstream text: its K/V past the cut is forgotten first). Knows nothing of chat
templates or teams.
"""

from __future__ import annotations

import random

import torch

from ..engine.engine import Engine
from ..engine.request import Request, RequestIds, check_token_ids
from ..engine.sampling import SamplingParams
from ..errors import RequestError
from .models import LoadedModel


class RequestFactory:
    def __init__(self, engine: Engine, seed: int):
        self.engine = engine
        self._ids = RequestIds()
        self._rng = random.Random(seed)

    def build(self, head: str, loaded: LoadedModel, prompt_ids, params: SamplingParams, *, capacity: int,
              prompt_open: bool = False, tag: dict | None = None) -> Request:
        """A request of `head` (its model `loaded`, at most `capacity` pages of K/V), checked, not yet submitted."""
        prompt_ids = check_token_ids(prompt_ids, getattr(loaded.spec, "vocab_size", None), f"head {head!r}'s model")
        if not prompt_ids and not prompt_open:
            raise RequestError(f"the prompt for head {head!r} is empty: give at least one token")
        max_ctx = loaded.spec.max_position_embeddings
        if len(prompt_ids) + 1 > max_ctx:
            raise RequestError(
                f"prompt of {len(prompt_ids)} tokens does not fit the context of {loaded.key!r} ({max_ctx} tokens)")
        layout = loaded.built.layout
        need = layout.pages_for(len(prompt_ids) + 1)
        if need > capacity:
            raise RequestError(
                f"prompt of {len(prompt_ids)} tokens needs {need} pages ({layout.tokens_per_page} tokens per page) "
                f"but head {head!r} can hold at most {capacity} pages of K/V; use a larger pool or quota")
        seed = params.seed if params.seed is not None else self._rng.randrange(2**63)
        gen = None if params.greedy else torch.Generator().manual_seed(seed)
        return Request(id=self._ids.next(), head=head, model=loaded.key, prompt_ids=list(prompt_ids), params=params,
                       arrival=self.engine.now(), prompt_open=prompt_open, tag=dict(tag or {}), generator=gen)

    def extend(self, req: Request, ids: list[int], vocab_size: int | None, close: bool) -> None:
        """Append `ids` to `req`'s open prompt before the next step; `close` lets it start sampling."""
        ids = check_token_ids(ids, vocab_size, f"head {req.head!r}'s model")

        def apply():
            if req.status.done:
                return
            if close and not req.prompt_ids and not ids:
                self.engine.fail(req, f"the streamed prompt of request {req.id} closed empty")
                return
            req.extend_prompt(ids, close)

        self.engine.call_soon(apply)

    def truncate(self, req: Request, num_tokens: int) -> None:
        """Cut `req`'s open prompt back to `num_tokens` ids before the next step; its K/V past the cut is forgotten
        first, never rewriting a page another request may share."""

        def apply():
            if not req.status.done:
                self.engine.scheduler.rollback(req, num_tokens)
                req.truncate_prompt(num_tokens)

        self.engine.call_soon(apply)
