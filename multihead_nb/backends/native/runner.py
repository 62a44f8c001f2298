"""One model's runner: its weights, its view of the arena's pages, and `forward(ForwardBatch) -> logits`.

Owns: loading a `ModelSpec`'s weights onto the device, the model's `KVLayout` over the shared arena (per-layer
cache views, no copy), and turning a `ForwardBatch` into one forward pass. Knows nothing of requests, heads or
which pages are whose: the batch's `slot_mapping` and `block_tables` say where K/V is written and read.
"""

from __future__ import annotations

import torch

from ...config import parse_dtype
from ...errors import ConfigError
from ...memory import Arena
from .attention import build_metadata
from ..batch import ForwardBatch
from .cpu_isa import ISAS
from .cpu_kernel import KernelUnavailable, load_kernel
from .fused_forward import FusedForward, unsupported
from .kernel_weights import KernelWeights, gguf_weights
from .kernel_weights import problem as weight_problem
from .llama import LlamaModel
from .loader import ModelSpec
from .weight_files import load_weights

ACTIVATIONS = ("int8", "float32")  # the kernel's inputs to products with quantized weights; the first is the default
DEFAULT_ISAS = ("avx2", "avx512")  # builds used by default: measured faster than PyTorch (bench/README.md)


KV_CACHES = ("bf16", "int8")  # how the kernel stores K/V; the first is the default
KV_INT8_MAX_GROUP, KV_INT8_MAX_HEAD_DIM = 8, 256  # the int8 attention's limits (mh_attention_int8.h)


def _choice(option: str, value: str | None, choices: tuple[str, ...]) -> str:
    """`option=value` as the kernel takes it (the first choice when None); an error names a value it does not know."""
    if value is None:
        return choices[0]
    if value not in choices:
        raise ConfigError(f"{option}={value!r}: expected one of {', '.join(map(repr, choices))}")
    return value


def check_kv_cache(value: str | None) -> str:
    """`kv_cache=` as the kernel takes it ("bf16" when None)."""
    return _choice("kv_cache", value, KV_CACHES)


def kv_cache_problem(spec: ModelSpec, kv_cache: str) -> str | None:
    """Why `spec` cannot keep its K/V as `kv_cache` in the kernel, or None."""
    if kv_cache != "int8":
        return None
    group = spec.num_heads // spec.num_kv_heads
    if spec.head_dim % 32 or spec.head_dim > KV_INT8_MAX_HEAD_DIM or group > KV_INT8_MAX_GROUP:
        return (f"an int8 K/V cache needs a head_dim that is a multiple of 32 and at most {KV_INT8_MAX_HEAD_DIM}, "
                f"and at most {KV_INT8_MAX_GROUP} query heads per KV head; {spec.name} has head_dim "
                f"{spec.head_dim} and {group}")
    return None


def check_activations(value: str | None) -> str:
    """`activations=` as the kernel takes it ("int8" when None)."""
    return _choice("activations", value, ACTIVATIONS)


class ModelRunner:
    """Runs `spec` in `dtype` on `device`, keeping its K/V in `arena`'s pages.

    `packed`: None uses oneDNN prepacked linears where they work (CPU, bfloat16), False plain `F.linear`.
    `kernel`: the fused CPU kernel (`fused_forward.py`, every batch length). None uses it for bfloat16 on the CPU
    when this CPU has AVX2 + FMA or AVX-512 (measured faster than PyTorch at every batch size and in prefill, see
    bench/README.md) and it builds here; True requires it (the best build this CPU runs, the scalar one included);
    an instruction set's name ("avx512", "avx2", "neon", "scalar": `cpu_kernel.ISAS`) requires that build (to
    compare builds on one machine); False never uses it.
    `kernel_note` says which path runs and why.
    `quantize`: None keeps the checkpoint's weights (bfloat16 in the kernel), or one of `quant.QUANTIZABLE`
    ("q8_0", "q4_0", "q4_1", "bf16") quantizes the matrices at load; the kernel keeps them packed, the PyTorch path
    (no kernel here) runs their dequantized values.
    `activations`: how the kernel multiplies quantized weights: "int8" (the default) quantizes each 32-element block
    of a product's input to int8, as llama.cpp does, for integer products (faster; logits ~4e-2 from the float32
    reference instead of ~4e-3, see bench/README.md); "float32" multiplies the dequantized weights with float32
    inputs. x86 builds do either for every quantized format; NEON is always int8, the scalar build always float32.
    `kv_cache`: how the kernel stores K/V in the arena's pages: "bf16" (the default) or "int8" (int8 with a float32
    scale per 32 values, as llama.cpp's q8_0 cache: 1.78x the tokens per page, 56% of the bytes attention reads;
    the fused CPU kernel only, `memory/kv_layout.py`).
    """

    def __init__(self, spec: ModelSpec, arena: Arena, *, dtype: torch.dtype | str = torch.bfloat16,
                 device: torch.device | str | None = None, packed: bool | None = None, kernel: bool | str | None = None,
                 quantize: str | None = None, activations: str | None = None, kv_cache: str | None = None):
        self.spec = spec
        self.arena = arena
        self.dtype = parse_dtype(dtype)
        self.device = torch.device(device) if device is not None else arena.device
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        arena_dev = arena.device
        if arena_dev.type == "cuda" and arena_dev.index is None:
            arena_dev = torch.device("cuda", torch.cuda.current_device())
        if arena_dev != self.device:
            raise ConfigError(f"the runner's device {self.device} differs from the arena's device {arena.device}")
        if quantize is not None:
            why = weight_problem(spec, quantize)
            if why:
                raise ConfigError(f"cannot quantize {spec.name}: {why}")
        self.quantize = quantize
        self.activations = check_activations(activations)
        self.kv_cache = check_kv_cache(kv_cache)
        why = kv_cache_problem(spec, self.kv_cache)
        if why:
            raise ConfigError(f"cannot keep {spec.name}'s K/V as {self.kv_cache}: {why}")
        # ConfigError when a page cannot hold a token
        self.layout = spec.kv_layout(self.dtype, arena.page_bytes, self.kv_cache)
        cpu_kernel, self.kernel_note = self._kernel(kernel)
        self.caches = None
        if cpu_kernel is None:
            if self.layout.int8:
                raise ConfigError(f"kv_cache='int8' is read by the fused CPU kernel only, which {spec.name} does not "
                                  f"run here: {self.kernel_note}")
            full = self.layout.view(arena)  # [P, 2, layers, tpp, KV, d]
            # per layer [P, tpp, 2, KV, d]: keys at [:, :, 0], values at [:, :, 1]; strided views of the arena
            self.caches = [full[:, :, layer].permute(0, 2, 1, 3, 4) for layer in range(spec.num_layers)]
        if cpu_kernel is not None and quantize is None and getattr(spec, "gguf", None) is not None:
            weights = gguf_weights(spec)  # the file's blocks as they are
        else:  # quantized from float32 (the checkpoint's values, not their bfloat16 rounding), as llama.cpp converts
            weights = load_weights(spec, torch.float32 if quantize else self.dtype, self.device)
        self.model = self.fused = None
        if cpu_kernel is not None:
            packed_weights = KernelWeights.build(spec, weights, quantize)
            self.fused = FusedForward(cpu_kernel, spec, packed_weights, arena.data, self.layout, arena.page_bytes,
                                      int8_activations=self.activations == "int8")
            self.kernel_note = (f"fused CPU kernel {cpu_kernel.isa}, weights {packed_weights.describe()}"
                                + ("" if packed_weights.formats <= {"bf16"} else f", {self.activations} activations")
                                + (", int8 K/V cache" if self.layout.int8 else "")
                                + ("" if cpu_kernel.threaded else ", one thread (the C compiler has no OpenMP)"))
        else:
            if quantize is not None:  # the quantized model's values, run densely
                weights = KernelWeights.build(spec, weights, quantize).dense(self.dtype)
            self.model = LlamaModel(spec, weights, self.dtype, self.device, packed=packed)

    def _kernel(self, kernel: bool | str | None):
        """The fused CPU kernel if this runner uses it (and None), or None and why not."""
        if kernel is False:
            return None, "the fused CPU kernel is turned off"
        if isinstance(kernel, str) and kernel not in ISAS:
            raise ConfigError(f"kernel={kernel!r}: expected True, False, None or one of {', '.join(map(repr, ISAS))}")
        fits = self.device.type == "cpu" and self.dtype == torch.bfloat16
        if not fits:
            if kernel:
                raise ConfigError(f"the fused CPU kernel runs bfloat16 on the CPU, not {self.dtype} on {self.device}")
            return None, "the fused CPU kernel runs bfloat16 on the CPU only"
        shape = unsupported(self.spec)
        if shape is not None:
            if kernel:
                raise ConfigError(f"the fused CPU kernel cannot run this model: {shape}")
            return None, f"the fused CPU kernel cannot run {shape}"
        try:
            built = load_kernel(kernel if isinstance(kernel, str) else None)
        except KernelUnavailable as e:
            if kernel:
                raise ConfigError(f"the fused CPU kernel was required but is unavailable: {e.reason}") from e
            return None, e.reason
        if not kernel and not built.isa.startswith(DEFAULT_ISAS):
            return None, (f"the fused CPU kernel's {built.isa} build is not faster than PyTorch here "
                          "(cpu_kernel=True uses it anyway)")
        if not kernel and not built.threaded:
            return None, (f"the fused CPU kernel's {built.isa} build would run on one thread: the C compiler has no "
                          f"OpenMP ({built.why_one_thread[-300:]}); cpu_kernel=True uses it anyway, or set CC to "
                          "a compiler with OpenMP (gcc; Homebrew's llvm with libomp)")
        return built, None

    def weight_nbytes(self) -> int:
        """Bytes of weights actually held on the device (packed sizes in the kernel; may exceed
        `spec.weight_bytes` with the PyTorch path's prepacked copies)."""
        return self.fused.weights.nbytes() if self.fused is not None else self.model.weight_nbytes()

    @property
    def tokens_per_page(self) -> int:
        return self.layout.tokens_per_page

    def forward(self, batch: ForwardBatch) -> torch.Tensor:
        """Logits `[L, vocab]` float32 of the tokens at `batch.logits_indices`; writes the batch's K/V."""
        spec = self.spec
        max_ctx = max(batch.context_lens)
        if max_ctx > spec.max_position_embeddings:
            raise ConfigError(
                f"a sequence of {max_ctx} tokens exceeds the model's {spec.max_position_embeddings} positions"
            )
        with torch.inference_mode():
            if self.fused is not None:
                return self.fused.forward(batch)
            meta = build_metadata(
                batch, self.layout.tokens_per_page, spec.num_heads // spec.num_kv_heads, spec.sliding_window,
                self.device, spec.num_kv_heads, spec.head_dim, self.dtype,
            )
            return self.model.forward(
                batch.input_ids, batch.positions, max_ctx - 1, self.caches, meta, batch.logits_indices
            )

    def __repr__(self) -> str:
        return (f"ModelRunner({self.spec.name!r}, {self.spec.family}, dtype={self.dtype}, device={self.device}, "
                f"tokens_per_page={self.layout.tokens_per_page})")
