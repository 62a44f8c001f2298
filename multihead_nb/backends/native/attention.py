"""Paged attention over the arena: write a batch's K/V into its slots, then attend each sequence over its pages.

Owns: `AttentionMetadata` (everything index-related about one `ForwardBatch`, built once per forward and shared
by every layer) and `paged_attention` (one layer). Knows nothing of weights, RoPE or which model runs.

A layer's cache is the arena seen as `[num_pages, tokens_per_page, 2, kv_heads, head_dim]` (keys at index 0 of
dim 2, values at 1): one strided view, so one `index_put_` writes a token's keys and one `index_select` gathers a
sequence's pages for keys and values together. Every layer gathers into the same buffer (allocated once per
forward, with its key and value views), so a layer's attention is one write, one gather and one SDPA call.

Sequences are padded to the longest query (`max_q`) and the longest context (`max_k`) of the batch, so one
`scaled_dot_product_attention` call serves every sequence. Grouped-query heads are folded into the query rows
(`[S, kv_heads, max_q * group, head_dim]`), so keys and values are never repeated. The mask is built once per
forward as an additive mask in the model's dtype (SDPA would otherwise turn a boolean mask into one per layer);
a batch where every sequence decodes one token over the same context length needs none.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..batch import ForwardBatch


@dataclass
class AttentionMetadata:
    num_seqs: int  # S
    max_q: int  # longest query of the batch
    max_k: int  # max_pages * tokens_per_page: keys gathered per sequence (padded)
    group: int  # query heads per KV head
    write_page: torch.Tensor  # [T] int64 page of each token's slot
    write_offset: torch.Tensor  # [T] int64 offset inside that page
    gather_pages: torch.Tensor | None  # [S * max_pages] int64 page ids, padded with each sequence's page 0
    mask: torch.Tensor | None  # [S, 1, max_q * group or 1, max_k] additive (0 = attend, -inf = not), model dtype
    pad_index: torch.Tensor | None  # [T] int64 row of each token in [S * max_q]; None when all queries are max_q
    fresh: bool  # one sequence with no earlier context: attend its own K/V with a causal mask, no gather
    kv_len: int = 0  # with mask None: keys to attend (every sequence decodes one token over kv_len tokens)
    gathered: torch.Tensor | None = None  # [S * max_pages, tpp, 2, KV, D] scratch shared by the layers
    keys: torch.Tensor | None = None  # [S, KV, max_k or kv_len, D] view of `gathered`
    values: torch.Tensor | None = None  # [S, KV, max_k or kv_len, D] view of `gathered`


def _with_buffer(meta: AttentionMetadata, kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device,
                 tpp: int) -> AttentionMetadata:
    """Allocate the gather buffer once for all layers, and its key and value views."""
    S, n = meta.num_seqs, meta.gather_pages.shape[0]
    meta.gathered = torch.empty(n, tpp, 2, kv_heads, head_dim, dtype=dtype, device=device)
    length = meta.kv_len if meta.mask is None else meta.max_k
    kv = meta.gathered.view(S, meta.max_k, 2, kv_heads, head_dim)[:, :length]  # [S, length, 2, KV, D]
    meta.keys, meta.values = kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)  # [S, KV, length, D]
    return meta


def build_metadata(
    batch: ForwardBatch, tokens_per_page: int, group: int, sliding_window: int | None, device: torch.device,
    kv_heads: int, head_dim: int, dtype: torch.dtype,
) -> AttentionMetadata:
    """Everything index-related for `batch`, computed once (host lists → a few small device tensors), and the
    gather buffer every layer reuses."""
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

    if max_q == 1 and not windowed and all(c == max_ctx for c in clens):  # decoding over equal contexts: no mask
        meta = AttentionMetadata(S, 1, max_k, group, write_page, write_offset, gather_pages, None, None, False,
                                 kv_len=max_ctx)
        return _with_buffer(meta, kv_heads, head_dim, dtype, device, tpp)

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
    mask = torch.zeros(mask.shape, dtype=dtype, device=device).masked_fill_(~mask, float("-inf"))[:, None]
    # [S, 1, rows, max_k] additive

    pad_index = None
    if any(q != max_q for q in qlens):
        rows: list[int] = []
        for i, q in enumerate(qlens):
            rows.extend(range(i * max_q, i * max_q + q))
        pad_index = torch.tensor(rows, dtype=torch.long, device=device)  # [T]
    assert T == sum(qlens)
    meta = AttentionMetadata(S, max_q, max_k, group, write_page, write_offset, gather_pages, mask, pad_index, False)
    return _with_buffer(meta, kv_heads, head_dim, dtype, device, tpp)


def paged_attention(q: torch.Tensor, kv: torch.Tensor, cache: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
    """One layer's attention for the batch; returns `[T, heads * head_dim]`.

    q: [T, H, D]; kv: [T, 2, KV, D] keys (RoPE applied) and values; cache: [P, tokens_per_page, 2, KV, D] view
    of the arena.
    """
    T, H, D = q.shape
    KV = kv.shape[2]
    G = meta.group
    assert H == KV * G and kv.shape == (T, 2, KV, D) and cache.shape[2:] == (2, KV, D)

    cache.index_put_((meta.write_page, meta.write_offset), kv)  # this step's keys and values into their slots

    if meta.fresh:  # one sequence, nothing cached before: its own K/V are all it attends to
        qh = q.transpose(0, 1)[None]  # [1, H, T, D]
        kh = kv[:, 0].transpose(0, 1)[None]  # [1, KV, T, D]
        vh = kv[:, 1].transpose(0, 1)[None]
        out = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, enable_gqa=G > 1)  # [1, H, T, D]
        return out[0].transpose(0, 1).reshape(T, H * D)

    S, Q = meta.num_seqs, meta.max_q
    torch.index_select(cache, 0, meta.gather_pages, out=meta.gathered)  # [S * max_pages, tpp, 2, KV, D]
    if meta.pad_index is not None:
        q = q.new_zeros(S * Q, H, D).index_copy_(0, meta.pad_index, q)  # [S * Q, H, D]
    if Q == 1:
        qg = q.view(S, KV, G, D)  # [S, KV, G, D] rows = the group's heads
    else:
        qg = q.view(S, Q, KV, G, D).permute(0, 2, 1, 3, 4).reshape(S, KV, Q * G, D)  # rows (query, group)
    out = F.scaled_dot_product_attention(qg, meta.keys, meta.values, attn_mask=meta.mask)  # [S, KV, Q * G, D]
    if Q == 1:
        out = out.reshape(S, H * D)
    else:
        out = out.view(S, KV, Q, G, D).permute(0, 2, 1, 3, 4).reshape(S * Q, H * D)
    if meta.pad_index is not None:
        out = out.index_select(0, meta.pad_index)  # [T, H * D]
    assert out.shape == (T, H * D)
    return out
