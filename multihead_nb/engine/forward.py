"""Running a step's plan: one `ForwardBatch` per model, its forward, and the sampling of each request's next token.

Owns: turning a model's chunks into a `ForwardBatch` (token ids, positions, K/V slots, block tables), calling the
model's runner, and sampling, with each failure contained: a forward that raises fails the requests of that model's
batch only; a request whose sampling raises (bad logits for its parameters) fails alone. Knows nothing of queues,
pages' ownership or the requests' lifecycle: it reports what failed and the engine ends those requests.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from ..backends.batch import ForwardBatch
from ..config import ceil_div
from .plan import Chunk, StepPlan
from .sampler import sample


@dataclass
class ModelSlot:
    """What the engine needs of a loaded model."""

    runner: object  # has .forward(ForwardBatch) -> [L, vocab] logits, .layout, .device
    tokenizer: object
    eos_ids: frozenset[int]
    max_context: int


@dataclass
class StepOutput:
    sampled: dict[int, int] = field(default_factory=dict)  # request id -> token id
    failed: dict[int, str] = field(default_factory=dict)  # request id -> why it failed in this step
    causes: dict[int, BaseException] = field(default_factory=dict)  # request id -> the exception behind it
    batch_sizes: dict[str, int] = field(default_factory=dict)  # model -> sequences in its forward
    decode_tokens: dict[str, int] = field(default_factory=dict)  # model -> chunks that were decode steps
    forward_s: float = 0.0


def build_batch(chunks: list[Chunk], tpp: int, device) -> tuple[ForwardBatch, list[Chunk]]:
    """The forward batch of `chunks` (pages of `tpp` tokens) and the chunks that sample, in logits-row order."""
    ids, pos, slots, qlens, clens, tables, logit_idx, samplers = [], [], [], [], [], [], [], []
    for c in chunks:
        r, start, n = c.request, c.request.num_computed, c.num_tokens
        ids.extend(r.token_slice(start, start + n))
        pos.extend(range(start, start + n))
        table = r.block_table
        slots.extend(table[p // tpp] * tpp + p % tpp for p in range(start, start + n))
        qlens.append(n)
        clens.append(start + n)
        tables.append(table[: ceil_div(start + n, tpp)])
        if c.sample:
            logit_idx.append(len(ids) - 1)
            samplers.append(c)
    as_long = lambda xs: torch.tensor(xs, dtype=torch.long, device=device)  # noqa: E731
    return ForwardBatch(as_long(ids), as_long(pos), as_long(slots), qlens, clens, tables, as_long(logit_idx)), samplers


def run_plan(models: dict[str, ModelSlot], plan: StepPlan) -> StepOutput:
    out = StepOutput()
    t = time.perf_counter()
    for model, chunks in plan.by_model().items():
        slot = models.get(model)
        try:
            if slot is None:
                raise RuntimeError(f"model {model!r} is not loaded")
            batch, samplers = build_batch(chunks, slot.runner.layout.tokens_per_page, slot.runner.device)
            logits = slot.runner.forward(batch)  # [L, vocab]
            assert logits.shape[0] == len(samplers), (tuple(logits.shape), len(samplers))
        except Exception as e:  # a failed forward fails the requests in it, not the workspace
            for c in chunks:
                out.failed[c.request.id] = f"the forward pass of {model!r} failed: {type(e).__name__}: {e}"
                out.causes[c.request.id] = e
            continue
        out.batch_sizes[model] = batch.num_seqs
        out.decode_tokens[model] = sum(1 for c in chunks if c.request.num_computed >= len(c.request.prompt_ids))
        if samplers:
            _sample_into(out, logits.float().cpu(), samplers)
    out.forward_s = time.perf_counter() - t
    return out


def _sample_into(out: StepOutput, logits: torch.Tensor, samplers: list[Chunk]) -> None:
    # logits: [L, vocab] float32, one row per sampling chunk
    reqs = [c.request for c in samplers]
    try:
        tokens = sample(logits, [r.params for r in reqs], [r.generator for r in reqs])
        out.sampled.update((r.id, tok) for r, tok in zip(reqs, tokens))
        return
    except Exception:
        pass  # find the request(s) at fault: sample row by row
    for i, r in enumerate(reqs):
        try:
            out.sampled[r.id] = sample(logits[i : i + 1], [r.params], [r.generator])[0]
        except Exception as e:
            out.failed[r.id] = f"sampling failed for request {r.id} ({r.params}): {type(e).__name__}: {e}"
            out.causes[r.id] = e
