"""The backend protocol: how a model reference becomes a loaded model, without touching the workspace.

A backend is asked twice. `plan(model, target, options)` reads what the reference names (config, file headers) and
answers with a `ModelPlan`: the model's key, the bytes its weights will take, and the arena pages it wants for a
region of its own (0: its K/V pages come from the main pool). Nothing is allocated yet, so the workspace can refuse
a model that would not fit, naming the sizes. Then `build(plan, target, region)` loads it and answers with a
`BuiltModel`: the runner (`forward(ForwardBatch) -> [L, vocab]` float32 logits), its K/V layout, the tokenizer, the
ids that end a generation, and the weight bytes really held. A region backend (one that reads a single contiguous
cache, e.g. EXL2) gets its region's arena pages in `build` and brings the `RegionPool` its requests take pages from.

Owns: the protocol and the plain data that crosses it. Knows nothing of heads, requests, the scheduler or the pool's
accounting: the workspace (`workspace/models.py`) charges the pool and registers the model with the engine.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from ..errors import ConfigError
from ..memory import Arena
from ..memory.region_pool import RegionPool


@dataclass(frozen=True)
class LoadTarget:
    """Where a model is loaded: the workspace's arena (its device and page size) and dtype, and the workspace-wide
    backend settings (`cpu_kernel` for the native runner)."""

    arena: Arena
    dtype: torch.dtype
    cpu_kernel: bool | str | None = None

    @property
    def device(self) -> torch.device:
        return self.arena.device

    @property
    def page_bytes(self) -> int:
        return self.arena.page_bytes


@dataclass(frozen=True)
class ModelPlan:
    """What loading `key` will ask of the pool, known before anything is allocated."""

    key: str  # one loaded copy per key in a workspace (a resolved path, a hub id, a URL + model name)
    weight_bytes: int  # charged to the pool before the weights are loaded
    region_pages: int = 0  # contiguous arena pages for the model's own K/V (0: pages from the main pool)
    detail: Any = field(default=None, compare=False, repr=False)  # the backend's own (its spec)


@dataclass
class BuiltModel:
    """A loaded model, as the workspace registers it."""

    spec: Any  # has .name, .max_position_embeddings, .vocab_size, .eos_token_ids
    runner: Any  # has .forward(ForwardBatch) -> [L, vocab] float32, .layout, .device, .weight_nbytes()
    tokenizer: Any  # a transformers tokenizer with the chat template
    layout: Any  # .tokens_per_page, .pages_for(n): the scheduler's view of the model's pages
    eos_ids: frozenset[int]
    weight_bytes: int  # bytes really held (may exceed the plan's, e.g. prepacked copies)
    region: RegionPool | None = None  # a region backend's own pages
    note: str | None = None  # how it runs, for `%mh status` (e.g. which CPU kernel)


class Backend(Protocol):
    """Turns model references into loaded models. `options` names the per-model options it takes (from a head's
    definition, e.g. `region`); any other is an error."""

    name: str
    options: tuple[str, ...]

    def detects(self, model: str) -> bool:
        """Whether `backend="auto"` should pick this backend for `model` (cheap: no loading)."""

    def key(self, model: str, options: dict) -> str:
        """The key `model` would be loaded under with these per-model `options` (cheap: a resolved path, no
        reading; a remote model's key names its remote model too); `plan(model, target, options).key` equals it."""

    def plan(self, model: str, target: LoadTarget, options: dict) -> ModelPlan:
        """Read `model`'s shape and sizes; raise `CheckpointError`/`ConfigError` naming what is wrong."""

    def build(self, plan: ModelPlan, target: LoadTarget, region: list[int] | None) -> BuiltModel:
        """Load the planned model (its region's arena pages when it asked for some)."""

    def release(self, built: BuiltModel) -> None:
        """Drop what the model holds outside the arena (threads, connections); weights go with the object."""


def check_options(backend: Backend, model: str, options: dict) -> dict:
    """The options that are set, each one the backend takes; an error names the others and the backend."""
    given = {k: v for k, v in options.items() if v is not None}
    unknown = sorted(set(given) - set(backend.options))
    if unknown:
        takes = ", ".join(backend.options) or "no per-model options"
        raise ConfigError(f"{', '.join(f'{k}=' for k in unknown)} is not an option of the {backend.name!r} backend "
                          f"that runs {model!r} (it takes {takes})")
    return given


def eos_ids(spec_ids, tokenizer) -> frozenset[int]:
    """The ids that end a generation: the checkpoint's and the tokenizer's end-of-sequence token."""
    ids = set(spec_ids or ())
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(tokenizer.eos_token_id)
    return frozenset(ids)
