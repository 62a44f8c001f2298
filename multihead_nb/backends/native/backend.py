"""The native backend: Llama-family checkpoints run by `ModelRunner`, their K/V in pages of the main pool.

Owns: planning a native model (its spec read and checked, its K/V layout for the arena's page size, its weight
bytes in the workspace dtype, or packed when `quantize=` asks for a format) and building it (runner, tokenizer with
a working chat template), and which format each model it built was quantized to, which `activations=` its
kernel takes and how it keeps its K/V (`kv_cache=`; a head asking another of a loaded model is an error). Knows
nothing of the pool's accounting, heads or requests.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ...errors import CheckpointError, ConfigError
from ..base import BuiltModel, LoadTarget, ModelPlan, check_options, eos_ids


def model_key(model: str) -> str:
    """A local path by its resolved form; an Ollama name or embedded model by the GGUF file it names (so
    `ollama:x` and `ollama:x:latest` are one model); a hub id as given."""
    if model.startswith(("ollama:", "embedded:")):
        from .model_ref import resolve_model

        try:
            return str(resolve_model(model).path)
        except CheckpointError:
            return model  # planning it raises the error, with its message
    p = Path(model).expanduser()
    return str(p.resolve()) if p.exists() else model


class NativeBackend:
    name = "native"
    options: tuple[str, ...] = ("quantize", "activations", "kv_cache")

    def __init__(self):
        # key -> {"quantize", "activations", "kv_cache"} of the models built and not released
        self._loaded: dict[str, dict] = {}

    def detects(self, model: str) -> bool:
        return True  # the fallback of "auto": any reference another backend does not claim

    def key(self, model: str, options: dict | None = None) -> str:
        return model_key(model)

    def plan(self, model: str, target: LoadTarget, options: dict) -> ModelPlan:
        from . import read_spec

        from .kernel_weights import gguf_packed_bytes, packed_bytes
        from .kernel_weights import problem as quantize_problem
        from .runner import check_activations, check_kv_cache, kv_cache_problem

        options = check_options(self, model, options)
        quantize, activations = options.get("quantize"), check_activations(options.get("activations"))
        kv_cache = check_kv_cache(options.get("kv_cache"))
        key = self.key(model)
        loaded = self._loaded.get(key)
        for name, value in (("quantize", quantize), ("activations", activations), ("kv_cache", kv_cache)):
            if loaded is not None and name in options and value != loaded[name]:
                raise ConfigError(f"{model!r} is loaded with {name}={loaded[name]!r}; {name}={value!r} asks for "
                                  "another (remove its heads to change it)")
        spec = read_spec(model)
        if spec.max_position_embeddings < 1:
            raise CheckpointError(f"{spec.path}: max_position_embeddings must be positive, "
                                  f"got {spec.max_position_embeddings}")
        if kv_cache != "bf16" and (target.device.type != "cpu" or target.dtype != torch.bfloat16
                                   or target.cpu_kernel is False):
            raise ConfigError(f"kv_cache={kv_cache!r} is read by the fused CPU kernel only, which runs bfloat16 on the "
                              f"CPU; this workspace runs {target.dtype} on {target.device}"
                              + (" with cpu_kernel=False" if target.cpu_kernel is False else ""))
        why = kv_cache_problem(spec, kv_cache)
        if why:
            raise ConfigError(f"cannot keep {model!r}'s K/V as {kv_cache}: {why}")
        spec.kv_layout(target.dtype, target.page_bytes, kv_cache)  # ConfigError when a page cannot hold one token
        if quantize is None:
            packed = getattr(spec, "gguf", None) is not None and target.device.type == "cpu" \
                and target.dtype == torch.bfloat16 and target.cpu_kernel is not False
            # a GGUF file the kernel will likely run keeps its blocks: charged at their size (more, once loaded,
            # if the PyTorch path dequantizes them after all)
            size = gguf_packed_bytes(spec) if packed else spec.weight_bytes(target.dtype)
            return ModelPlan(key, size, detail=(spec, None, activations, kv_cache))
        why = quantize_problem(spec, quantize)
        if why:
            raise ConfigError(f"cannot quantize {model!r}: {why}")
        return ModelPlan(key, packed_bytes(spec, quantize), detail=(spec, quantize, activations, kv_cache))

    def build(self, plan: ModelPlan, target: LoadTarget, region: list[int] | None) -> BuiltModel:
        from . import ModelRunner
        from .tokenizer import load_tokenizer

        assert region is None, "native models take their K/V pages from the main pool"
        spec, quantize, activations, kv_cache = plan.detail
        runner = ModelRunner(spec, target.arena, dtype=target.dtype, device=target.device, kernel=target.cpu_kernel,
                             quantize=quantize, activations=activations, kv_cache=kv_cache)
        try:
            tokenizer = load_tokenizer(spec)  # a GGUF spec's open file is reused
        except CheckpointError:
            raise
        except Exception as e:  # a broken tokenizer file: name the checkpoint, not the parser's internals
            raise CheckpointError(f"cannot load the tokenizer of {spec.path}: {type(e).__name__}: {e}") from None
        note = runner.kernel_note if runner.fused is not None else f"PyTorch ({runner.kernel_note})"
        self._loaded[plan.key] = {"quantize": quantize, "activations": activations, "kv_cache": kv_cache}
        return BuiltModel(spec, runner, tokenizer, runner.layout, eos_ids(spec.eos_token_ids, tokenizer),
                          runner.weight_nbytes(), note=note)

    def release(self, built: BuiltModel) -> None:
        self._loaded.pop(self.key(built.spec.name), None)
