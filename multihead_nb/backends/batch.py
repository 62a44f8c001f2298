"""The contract between the scheduler and a model runner: one model's flattened batch for one step.

Owns: the `ForwardBatch` shape. Knows nothing of heads or requests; built by the engine, read by runners.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class ForwardBatch:
    """S sequences, T tokens in all: decode tokens of some sequences and prefill chunks of others, flattened.

    Sequence i contributes `query_lens[i]` consecutive tokens to `input_ids` (in sequence order). Before this
    step it has `context_lens[i] - query_lens[i]` tokens of K/V in its pages already; after it, `context_lens[i]`.
    """

    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64, the position of each token in its own sequence
    slot_mapping: torch.Tensor  # [T] int64, page_id * tokens_per_page + offset: where each token's K/V is written
    query_lens: list[int]  # [S]
    context_lens: list[int]  # [S]
    block_tables: list[list[int]]  # [S] page ids of each sequence in order; covers context_lens[i] tokens
    logits_indices: torch.Tensor  # [L] int64, indices into the T tokens whose next-token logits are wanted

    def __post_init__(self):
        T = self.input_ids.shape[0]
        assert self.input_ids.dim() == 1 and self.positions.shape == (T,) and self.slot_mapping.shape == (T,)
        assert len(self.query_lens) == len(self.context_lens) == len(self.block_tables)
        assert sum(self.query_lens) == T, f"query_lens sum {sum(self.query_lens)} != {T} tokens"
        assert all(0 < q <= c for q, c in zip(self.query_lens, self.context_lens))

    @property
    def num_tokens(self) -> int:
        return self.input_ids.shape[0]

    @property
    def num_seqs(self) -> int:
        return len(self.query_lens)
