"""The EXL2 runner: an ExLlamaV2 model whose K/V lives in an `Exl2Region` of the shared arena (CUDA only).

Owns: `Exl2Layout` (the scheduler's view of the model's 256-token pages), `Exl2Runner`, the `ModelRunner`
look-alike that loads the model with exllamav2, hands it the region's views as its cache tensors and runs the
calls `exl2_batch.paged_params_fields` translates (the backend that builds it is `backend.py`). Does not know which
pages are whose (the batch's `block_tables` hold EXL2 page ids 0..N-1 of the model's region), heads, requests or
sampling. Checkpoint detection and the lazy import are `exl2_checkpoint.py`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...config import ceil_div
from ...errors import CheckpointError, ConfigError
from ...memory import Arena
from ..batch import ForwardBatch
from .batch import paged_params_fields
from .checkpoint import Exl2Spec, is_exl2_checkpoint, read_exl2_spec, require_exllamav2
from .region import EXL2_DTYPE, EXL2_PAGE_TOKENS, Exl2Region, bytes_per_exl2_page


# ---- the runner --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Exl2Layout:
    """The scheduler's view of an EXL2 model's pages: 256-token pages of the model's region (ids 0..N-1)."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    num_pages: int  # N, pages in the region
    tokens_per_page: int = EXL2_PAGE_TOKENS
    dtype: torch.dtype = EXL2_DTYPE

    @property
    def bytes_per_page(self) -> int:
        return bytes_per_exl2_page(self.num_layers, self.num_kv_heads, self.head_dim)

    def pages_for(self, num_tokens: int) -> int:
        return ceil_div(num_tokens, self.tokens_per_page)


class Exl2Runner:
    """Runs an EXL2 (or FP16 Llama-family) checkpoint with exllamav2 on CUDA, its K/V in `region_pages` of `arena`.

    `region_pages`: the contiguous arena pages granted to the model (`reserve_region`). `max_input_len` (tokens
    per `forward_chunk` call) sizes exllamav2's scratch buffers. Same surface as `ModelRunner`: `.layout`,
    `.device`, `.forward(batch) -> [L, vocab]` float32, where `batch.block_tables` hold EXL2 page ids 0..N-1.
    """

    def __init__(self, spec_or_path, arena: Arena, region_pages, *, device: torch.device | str | None = None,
                 max_input_len: int = 2048):
        exl = require_exllamav2()
        self.exl = exl
        self.spec = spec_or_path if isinstance(spec_or_path, Exl2Spec) else read_exl2_spec(
            getattr(spec_or_path, "path", spec_or_path))
        spec = self.spec
        self.arena = arena
        dev = torch.device(device) if device is not None else arena.device
        if dev.type != "cuda":
            raise ConfigError(f"EXL2 models run on CUDA only; the runner's device is {dev}")
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        arena_dev = arena.device if arena.device.index is not None else torch.device("cuda", torch.cuda.current_device())
        if arena.device.type != "cuda" or arena_dev != dev:
            raise ConfigError(f"the EXL2 runner's device {dev} differs from the arena's device {arena.device}")
        self.device = dev
        self.region = Exl2Region.from_pages(list(region_pages), arena.page_bytes, spec.num_layers,
                                            spec.num_kv_heads, spec.head_dim)
        self.layout = Exl2Layout(spec.num_layers, spec.num_kv_heads, spec.head_dim, self.region.num_exl2_pages)

        config = exl.ExLlamaV2Config(str(spec.path))
        config.max_input_len = max_input_len
        config.max_attention_size = max_input_len ** 2
        config.max_batch_size = 1  # scratch is sized for max_batch_size * max_input_len tokens per call
        config.arch_compat_overrides(quiet=True)
        if config.no_flash_attn:
            raise ConfigError(f"exllamav2 disabled flash-attn for {spec.path} (its architecture needs features the "
                              "installed flash-attn lacks); paged attention cannot run without it")
        got = (config.num_hidden_layers, config.num_key_value_heads, config.head_dim)
        if got != (spec.num_layers, spec.num_kv_heads, spec.head_dim):
            raise CheckpointError(f"exllamav2 reads {spec.path} as layers/kv_heads/head_dim {got}, config.json says "
                                  f"{(spec.num_layers, spec.num_kv_heads, spec.head_dim)}")
        self.config = config
        self.max_tokens_per_call = config.max_input_len * config.max_batch_size
        self.vocab_size = config.vocab_size
        model = exl.ExLlamaV2(config)
        split = None if dev.index == 0 else [0.0] * dev.index + [1.0e5]  # manual split: every layer on `dev`
        with torch.cuda.device(dev):
            model.load(gpu_split=split)
        cache_devs = {str(torch.device(d)) for d in model.cache_map.values()}
        if cache_devs != {str(dev)}:
            raise ConfigError(f"exllamav2 placed attention layers on {sorted(cache_devs)}, the arena is on {dev}")
        self.model = model
        # A lazy FP16 cache: per-layer key/value tensors left unset, then pointed at the region (no copy).
        cache = exl.ExLlamaV2Cache(model, batch_size=1, max_seq_len=self.region.max_seq_len, lazy=True)
        keys, values = self.region.layer_views(arena)  # each [1, N*256, KV, d] fp16, views of the arena
        for i in range(spec.num_layers):
            cache.key_states[i] = keys[i]
            cache.value_states[i] = values[i]
        self.cache = cache
        self.tokenizer = exl.ExLlamaV2Tokenizer(config)

    @property
    def tokens_per_page(self) -> int:
        return self.layout.tokens_per_page

    def weight_nbytes(self) -> int:
        return self.spec.weight_bytes

    def forward(self, batch: ForwardBatch) -> torch.Tensor:
        """Logits `[L, vocab]` float32 of the tokens at `batch.logits_indices`; writes the batch's K/V."""
        max_ctx = max(batch.context_lens)
        if max_ctx > self.config.max_seq_len:
            raise ConfigError(f"a sequence of {max_ctx} tokens exceeds the model's {self.config.max_seq_len} positions")
        n = self.layout.num_pages
        bad = [p for t in batch.block_tables for p in t if not 0 <= p < n]
        if bad:
            raise ValueError(f"EXL2 page ids {bad[:5]} outside the region's pages 0..{n - 1}")
        L, V = batch.logits_indices.shape[0], self.vocab_size
        out = torch.empty((L, V), dtype=torch.float32, device=self.device)  # [L, vocab]
        # exllamav2 runs on its own CUDA stream and makes it the thread's current stream (set_device_streams);
        # order it after the caller's work on the arena, and give the caller its stream back, ordered after ours.
        caller = torch.cuda.current_stream(self.device)
        theirs = self.exl.get_device_stream(self.device.index) if self.exl.get_device_stream else None
        if theirs is not None:
            theirs.wait_stream(caller)
        try:
            with torch.inference_mode(), torch.cuda.device(self.device):
                self._run_calls(batch, out)
        finally:
            now = torch.cuda.current_stream(self.device)
            if now != caller:
                caller.wait_stream(now)
                torch.cuda.set_stream(caller)
        return out

    def _run_calls(self, batch: ForwardBatch, out: torch.Tensor) -> None:
        V = self.vocab_size
        for c in paged_params_fields(batch, EXL2_PAGE_TOKENS, self.max_tokens_per_call):
            params = self.exl.PagedParams(c["batch_size"], c["block_index"], c["cache_seqlens"],
                                          c["max_cache_seqlen"], c["page_size"], c["q_len"])
            r = self.model.forward_chunk(
                input_ids=c["input_ids"],  # [b, q] int64 on the CPU: the embedding lives on the CPU
                cache=self.cache, attn_params=params,
                preprocess_only=c["preprocess_only"], last_id_only=c["last_id_only"],
            )
            self.cache.current_seq_len = 0  # forward_chunk advances it; paged calls never read it
            if c["preprocess_only"]:
                continue
            logits = r["logits"][..., :V]  # [b, q or 1, padded vocab] fp16 -> real vocab
            assert logits.shape[0] == c["batch_size"]
            flat = logits.reshape(-1, V)  # [b * q (or b), V]
            out[c["logits_rows"].to(self.device)] = flat[c["logits_src"].to(flat.device)].float().to(self.device)

    def __repr__(self) -> str:
        return (f"Exl2Runner({self.spec.name!r}, exllamav2 {self.exl.version}, device={self.device}, "
                f"pages={self.layout.num_pages} x {EXL2_PAGE_TOKENS} tokens)")


# ---- the backend the workspace loads EXL2 models with ---------------------------------------------------
