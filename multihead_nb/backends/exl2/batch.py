"""Translating a `ForwardBatch` into exllamav2 `forward_chunk` calls with `PagedParams` fields (pure torch, CPU).

Owns: the batching rule of exllamav2's dynamic generator (generator/dynamic.py, 0.3.2): all decode sequences (one
new token each) go in one call `[b, 1]`; each prefill chunk is a call of its own `[1, q]`; `block_index` is int32
`[b, max_pages]` padded with page 0 (flash-attn reads only the first ceil(seqlen / 256) entries of a row);
`cache_seqlens` int32 `[b]` counts the tokens already in the cache before the call. Does not know exllamav2
itself, the arena or which pages are whose.
"""

from __future__ import annotations

import torch

from ...config import ceil_div

from ..batch import ForwardBatch
from .region import EXL2_PAGE_TOKENS


# ---- ForwardBatch -> forward_chunk calls -------------------------------------------------------------------
def paged_params_fields(batch: ForwardBatch, page_size: int = EXL2_PAGE_TOKENS,
                        max_tokens_per_call: int | None = None) -> list[dict]:
    """The `forward_chunk` calls that compute `batch`, with their `PagedParams` fields (all CPU tensors).

    Decode sequences (query_len 1) share calls of up to `max_tokens_per_call` sequences; each prefill chunk is
    a call of its own, cut into pieces of at most `max_tokens_per_call` tokens. Each call is a dict:

    - `input_ids` int64 `[b, q_len]`; `batch_size` b; `q_len`; `page_size`
    - `block_index` int32 `[b, max_pages]`: row i lists the sequence's EXL2 pages covering its tokens after the
      call (ceil((cache_seqlen + q_len) / page_size) pages), padded with 0
    - `cache_seqlens` int32 `[b]`: tokens in the cache before the call; `max_cache_seqlen` their max
    - `seqs`: the batch's sequence indices in row order; `token_rows` int64 `[b * q_len]`: the flattened batch
      rows the call computes (row-major over `[b, q_len]`)
    - `preprocess_only` (no logits wanted), `last_id_only` (only the last token's); `logits_rows` int64 `[k]`:
      positions in the batch's `[L]` logits output, `logits_src` int64 `[k]`: rows of the call's logits viewed
      as `[-1, vocab]` that fill them.
    """
    if page_size < 1:
        raise ValueError(f"page_size must be positive, got {page_size}")
    cap = max_tokens_per_call or (1 << 62)
    ids = batch.input_ids.detach().to("cpu", torch.int64)  # [T]
    starts = [0]
    for q in batch.query_lens:
        starts.append(starts[-1] + q)
    want: dict[int, list[int]] = {}  # batch row -> positions in logits output
    for pos, row in enumerate(batch.logits_indices.detach().cpu().tolist()):
        if not 0 <= row < batch.num_tokens:
            raise ValueError(f"logits index {row} outside the batch's {batch.num_tokens} tokens")
        want.setdefault(int(row), []).append(pos)
    for i, (c, table) in enumerate(zip(batch.context_lens, batch.block_tables)):
        if len(table) < ceil_div(c, page_size):
            raise ValueError(f"sequence {i}: {len(table)} pages cannot hold its {c} tokens "
                             f"({page_size} tokens per page)")

    def call(seqs: list[int], rows: list[list[int]], past: list[int]) -> dict:
        b, q = len(seqs), len(rows[0])
        after = [p + q for p in past]
        width = max(ceil_div(a, page_size) for a in after)
        block_index = torch.zeros((b, width), dtype=torch.int32)  # [b, max_pages], padded with page 0
        for r, (s, a) in enumerate(zip(seqs, after)):
            pages = batch.block_tables[s][: ceil_div(a, page_size)]
            block_index[r, : len(pages)] = torch.tensor(pages, dtype=torch.int32)
        flat = [t for rr in rows for t in rr]
        token_rows = torch.tensor(flat, dtype=torch.int64)  # [b * q]
        needed = [(k, t) for k, t in enumerate(flat) if t in want]
        last_only = b == 1 and q > 1 and [k for k, _ in needed] == [q - 1]
        logits_rows, logits_src = [], []
        for k, t in needed:
            for pos in want[t]:
                logits_rows.append(pos)
                logits_src.append(0 if last_only else k)
        return dict(
            input_ids=ids[token_rows].view(b, q), batch_size=b, q_len=q, page_size=page_size,
            block_index=block_index, cache_seqlens=torch.tensor(past, dtype=torch.int32),
            max_cache_seqlen=max(past), seqs=seqs, token_rows=token_rows,
            preprocess_only=not needed, last_id_only=last_only,
            logits_rows=torch.tensor(logits_rows, dtype=torch.int64),
            logits_src=torch.tensor(logits_src, dtype=torch.int64),
        )

    calls: list[dict] = []
    decode = [i for i, q in enumerate(batch.query_lens) if q == 1]
    for g in range(0, len(decode), cap):
        group = decode[g : g + cap]
        calls.append(call(group, [[starts[i]] for i in group],
                          [batch.context_lens[i] - 1 for i in group]))
    for i, q in enumerate(batch.query_lens):
        if q == 1:
            continue
        past = batch.context_lens[i] - q
        for a in range(0, q, cap):
            e = min(q, a + cap)
            calls.append(call([i], [list(range(starts[i] + a, starts[i] + e))], [past + a]))
    return calls
