"""Paged attention over the arena: write a batch's K/V into its slots, then attend each sequence over its pages.

Owns: `AttentionMetadata` (everything index-related about one `ForwardBatch`, built once per forward and shared
by every layer) and `paged_attention` (one layer). Knows nothing of weights, RoPE or which model runs.

A layer's cache is the arena seen as `[num_pages, tokens_per_page, 2, kv_heads, head_dim]` (keys at index 0 of
dim 2, values at 1): one strided view, so one `index_put_` writes a token's keys and one `index_select` gathers a
sequence's pages for keys and values together.

Sequences are padded to the longest query (`max_q`) and the longest context (`max_k`) of the batch, so one
`scaled_dot_product_attention` call serves every sequence. Grouped-query heads are folded into the query rows
(`[S, kv_heads, max_q * group, head_dim]`), so keys and values are never repeated.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .batch import ForwardBatch


@dataclass
class AttentionMetadata:
    num_seqs: int  # S
    max_q: int  # longest query of the batch
    max_k: int  # max_pages * tokens_per_page: keys gathered per sequence (padded)
    group: int  # query heads per KV head
    write_page: torch.Tensor  # [T] int64 page of each token's slot
    write_offset: torch.Tensor  # [T] int64 offset inside that page
    gather_pages: torch.Tensor | None  # [S * max_pages] int64 page ids, padded with each sequence's page 0
    mask: torch.Tensor | None  # [S, 1, max_q * group or 1, max_k] bool, True = attend
    pad_index: torch.Tensor | None  # [T] int64 row of each token in [S * max_q]; None when all queries are max_q
    fresh: bool  # one sequence with no earlier context: attend its own K/V with a causal mask, no gather
    kv_len: int = 0  # with mask None: keys to attend (one sequence decoding one token attends all its context)


def build_metadata(
    batch: ForwardBatch, tokens_per_page: int, group: int, sliding_window: int | None, device: torch.device
) -> AttentionMetadata:
    """Everything index-related for `batch`, computed once (host lists → a few small device tensors)."""
    S, T, tpp = batch.num_seqs, batch.num_tokens, tokens_per_page
    qlens, clens = batch.query_lens, batch.context_lens
    max_q, max_ctx = max(qlens), max(clens)
    slot = batch.slot_mapping
    write_page = torch.div(slot, tpp, rounding_mode="floor")  # [T]
    write_offset = slot - write_page * tpp  # [T]
    windowed = sliding_window is not None and sliding_window < max_ctx
    fresh = S == 1 and clens[0] == qlens[0] and not windowed
    if fresh:
        return AttentionMetadata(S, max_q, max_q, group, write_page, write_offset, None, None, None, True)

    max_pages = -(-max_ctx // tpp)
    pages: list[int] = []
    for i, table in enumerate(batch.block_tables):
        n = -(-clens[i] // tpp)
        assert len(table) >= n, f"sequence {i}: block table of {len(table)} pages for {clens[i]} tokens"
        pages.extend(table[:n])
        pages.extend([table[0]] * (max_pages - n))
    gather_pages = torch.tensor(pages, dtype=torch.long, device=device)  # [S * max_pages]
    max_k = max_pages * tpp

    if S == 1 and max_q == 1 and not windowed:  # one sequence decoding: it attends its whole context, no mask
        return AttentionMetadata(S, 1, max_k, group, write_page, write_offset, gather_pages, None, None, False,
                                 kv_len=clens[0])

    ctx = torch.tensor(clens, dtype=torch.long, device=device)  # [S]
    ql = torch.tensor(qlens, dtype=torch.long, device=device)  # [S]
    j = torch.arange(max_q, device=device)  # [max_q]
    qpos = ctx[:, None] - ql[:, None] + j[None, :]  # [S, max_q] position of query j of sequence i
    qpos = torch.minimum(qpos, ctx[:, None] - 1)  # padded query rows attend like the last real one
    kpos = torch.arange(max_k, device=device)  # [max_k]
    mask = kpos[None, None, :] <= qpos[:, :, None]  # [S, max_q, max_k] causal, and inside the context
    if windowed:
        mask &= kpos[None, None, :] > qpos[:, :, None] - sliding_window
    if max_q > 1 and group > 1:
        mask = mask.repeat_interleave(group, dim=1)  # [S, max_q * group, max_k], rows ordered (query, group)
    mask = mask[:, None]  # [S, 1, rows, max_k]

    pad_index = None
    if any(q != max_q for q in qlens):
        rows: list[int] = []
        for i, q in enumerate(qlens):
            rows.extend(range(i * max_q, i * max_q + q))
        pad_index = torch.tensor(rows, dtype=torch.long, device=device)  # [T]
    assert T == sum(qlens)
    return AttentionMetadata(S, max_q, max_k, group, write_page, write_offset, gather_pages, mask, pad_index, False)


def paged_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: torch.Tensor, meta: AttentionMetadata
) -> torch.Tensor:
    """One layer's attention for the batch; returns `[T, heads * head_dim]`.

    q: [T, H, D]; k, v: [T, KV, D] (RoPE applied); cache: [P, tokens_per_page, 2, KV, D] view of the arena.
    """
    T, H, D = q.shape
    KV = k.shape[1]
    G = meta.group
    assert H == KV * G and k.shape == v.shape == (T, KV, D) and cache.shape[2:] == (2, KV, D)

    # write this step's keys and values into their slots
    cache[:, :, 0].index_put_((meta.write_page, meta.write_offset), k)
    cache[:, :, 1].index_put_((meta.write_page, meta.write_offset), v)

    if meta.fresh:  # one sequence, nothing cached before: its own K/V are all it attends to
        qh = q.transpose(0, 1)[None]  # [1, H, T, D]
        kh = k.transpose(0, 1)[None]  # [1, KV, T, D]
        vh = v.transpose(0, 1)[None]
        out = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, enable_gqa=G > 1)  # [1, H, T, D]
        return out[0].transpose(0, 1).reshape(T, H * D)

    S, Q = meta.num_seqs, meta.max_q
    gathered = cache.index_select(0, meta.gather_pages)  # [S * max_pages, tpp, 2, KV, D]
    keys = gathered[:, :, 0].reshape(S, meta.max_k, KV, D).transpose(1, 2)  # [S, KV, max_k, D] (a view)
    values = gathered[:, :, 1].reshape(S, meta.max_k, KV, D).transpose(1, 2)  # [S, KV, max_k, D]

    if meta.mask is None:
        keys, values = keys[:, :, : meta.kv_len], values[:, :, : meta.kv_len]  # [1, KV, ctx, D]
    if meta.pad_index is not None:
        q = q.new_zeros(S * Q, H, D).index_copy_(0, meta.pad_index, q)  # [S * Q, H, D]
    if Q == 1:
        qg = q.view(S, KV, G, D)  # [S, KV, G, D] rows = the group's heads
    else:
        qg = q.view(S, Q, KV, G, D).permute(0, 2, 1, 3, 4).reshape(S, KV, Q * G, D)  # rows (query, group)
    out = F.scaled_dot_product_attention(qg, keys, values, attn_mask=meta.mask)  # [S, KV, Q * G, D]
    if Q == 1:
        out = out.reshape(S, H * D)
    else:
        out = out.view(S, KV, Q, G, D).permute(0, 2, 1, 3, 4).reshape(S * Q, H * D)
    if meta.pad_index is not None:
        out = out.index_select(0, meta.pad_index)  # [T, H * D]
    assert out.shape == (T, H * D)
    return out
