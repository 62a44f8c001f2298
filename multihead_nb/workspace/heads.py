"""Heads: a model plus a system prompt, sampling defaults and limits.

Owns: `Head` (a named agent's definition, with how its model is run: `backend`; for region backends such as EXL2,
the `region` of the pool its model's K/V lives in; for native models `quantize`, `activations` and `kv_cache`; for
the remote backend, `remote_model`, `api_key`, `timeout` and `retries`). Knows nothing of pages, tensors or the
engine; the workspace turns a head's `quota` and `region` into pages, and hands the model options to the backend
that loads its model.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..engine.sampling import SAMPLING_OPTIONS, SamplingParams, check_int, check_number
from ..errors import ConfigError

LIMIT_OPTIONS = ("quota", "weight", "max_concurrent")
MODEL_OPTIONS = ("backend", "region", "quantize", "activations", "kv_cache", "remote_model", "api_key", "timeout",
                 "retries")
HEAD_OPTIONS = SAMPLING_OPTIONS + LIMIT_OPTIONS + MODEL_OPTIONS


@dataclass
class Head:
    """A named agent: which model it runs, its system prompt, sampling defaults and limits."""

    name: str
    model: str
    system: str | None = None
    sampling: SamplingParams = field(default_factory=SamplingParams)
    quota: str | int | float | None = None  # a share of the pool ("25%", 0.25) or a size ("256MiB")
    weight: float = 1.0  # fair share relative to other heads
    max_concurrent: int | None = None
    # "auto": EXL2 checkpoints run on the "exl2" backend, others natively; or "native", or a workspace backend name
    backend: str = "auto"
    region: str | int | float | None = None  # region backends: the model's share of the pool ("25%") or a size
    quantize: str | None = None  # native models: matrices quantized at load ("q8_0", "q4_0", "q4_1"; kept packed)
    # native models in the CPU kernel: "int8" (default: quantized weights times int8 activations, as llama.cpp) or
    # "float32" (slower, logits ~10x closer to the float32 reference)
    activations: str | None = None
    # native models in the CPU kernel: how K/V are kept in the pool's pages: "bf16" (default) or "int8" (a scale per
    # 32 values, as llama.cpp's q8_0 cache: ~1.8x the tokens per page, the logits a little further from the reference)
    kv_cache: str | None = None
    # the remote backend (model="openai:http://HOST:PORT/v1"): the engine's model name, its key, seconds it may
    # stay silent, tries again on connection errors
    remote_model: str | None = None
    api_key: str | None = field(default=None, repr=False)
    timeout: float | None = None
    retries: int | None = None

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name.isidentifier():
            raise ConfigError(
                f"a head name must be a Python identifier (letters, digits, _), got {self.name!r}; "
                "team templates refer to heads as {name}"
            )
        check_number("weight", self.weight, lo=0.0, lo_open=True)
        if self.max_concurrent is not None:
            check_int("max_concurrent", self.max_concurrent, lo=1)
        if not isinstance(self.backend, str) or not self.backend:
            raise ConfigError(f"backend must be a name like 'auto', 'native' or 'exl2', got {self.backend!r}")

    @classmethod
    def from_options(cls, name: str, model: str, system: str | None = None, **options) -> "Head":
        unknown = set(options) - set(HEAD_OPTIONS)
        if unknown:
            raise ConfigError(f"unknown head option(s) {sorted(unknown)}; known: {', '.join(HEAD_OPTIONS)}")
        sampling = SamplingParams(**{k: v for k, v in options.items() if k in SAMPLING_OPTIONS})
        limits = {k: v for k, v in options.items() if k in LIMIT_OPTIONS + MODEL_OPTIONS and v is not None}
        return cls(name=name, model=model, system=system, sampling=sampling, **limits)
