"""A model's weights as the fused CPU kernel reads them: every matrix a `PackedMatrix` (bfloat16 or GGUF blocks,
each in its own format), norms and biases float32.

Owns: turning a dense weight dict (Hugging Face names, from `weight_files.load_weights`) into that set, quantizing
at load when asked (`quantize="q8_0"` etc.: the layers' matrices in that format, the embedding / lm_head in Q8_0
for the 4-bit formats, as llama.cpp keeps its output matrix above 4 bits), taking packed matrices as they are
(GGUF tensors, no dequantized copy), interleaving rows where the kernel asks (`interleave_rows`), placing every
matrix in one buffer in the order a forward reads them (`place_in_one_buffer`), why a model cannot be packed
(`problem`), and the bytes held. Knows nothing of the kernel's structs (`fused_forward.py`) nor of
files.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ...memory.host_bytes import copying_file_pages_pays, host_bytes, release_file_pages, return_freed_memory
from .loader import ModelSpec
from .quant import INTERLEAVED, QUANTIZABLE, PackedMatrix, interleave, quantize, shape_problem

LINEARS = ("q", "k", "v", "o", "gate", "up", "down")
COPY_CHUNK_BYTES = 8 << 20  # a mapped matrix is copied and its file pages released this many bytes at a time
HF_NAMES = {"q": "self_attn.q_proj.weight", "k": "self_attn.k_proj.weight", "v": "self_attn.v_proj.weight",
            "o": "self_attn.o_proj.weight", "gate": "mlp.gate_proj.weight", "up": "mlp.up_proj.weight",
            "down": "mlp.down_proj.weight"}


def gguf_weights(spec: ModelSpec) -> dict:
    """A GGUF spec's tensors for `KernelWeights.build`, by Hugging Face name: every matrix in a format the kernel
    reads as a `PackedMatrix` over the file's own bytes (memory-mapped, no copy; llama-arch q/k rows put back in
    Hugging Face order by a gather of whole rows), everything else dequantized: vectors to float32, matrices of
    other GGML types (F16, F32) to float32 here and bfloat16 in the kernel (a converted copy of those only)."""
    import warnings

    from .gguf_config import gguf_name, unpermute_rows
    from .gguf_dequant import dequantize
    from .quant import format_of_ggml, from_ggml

    g = spec.gguf
    permuted = g.architecture == "llama"
    out: dict = {}
    for name, shape in spec.tensor_shapes().items():
        t = g.tensors[gguf_name(name)]
        heads = (spec.num_heads if "q_proj" in name else spec.num_kv_heads if "k_proj" in name else 0) if permuted \
            else 0
        if len(shape) == 2 and format_of_ggml(t.ggml_type) is not None:
            with warnings.catch_warnings():  # the map is read-only, and the kernel only reads it
                warnings.simplefilter("ignore", UserWarning)
                pm = from_ggml(t.raw, t.ggml_type, shape)
            if heads:  # rows gathered: a copy
                pm = PackedMatrix(pm.format, pm.rows, pm.cols, unpermute_rows(pm.data, heads).contiguous())
            else:  # the file's own bytes (from_ggml made no copy): place_in_one_buffer may release their pages
                pm.mapped = pm.data.data_ptr() == t.raw.ctypes.data
            out[name] = pm
        else:
            w = dequantize(t.raw, t.ggml_type, shape, torch.float32, "cpu")
            out[name] = unpermute_rows(w, heads) if heads else w
    return out


def gguf_packed_bytes(spec: ModelSpec) -> int:
    """The bytes `KernelWeights.build(spec, gguf_weights(spec))` holds: the file's blocks for the matrices the kernel
    reads, bfloat16 for other matrices, float32 for vectors."""
    from .gguf_config import gguf_name
    from .quant import format_of_ggml

    total = 0
    for name, shape in spec.tensor_shapes().items():
        t = spec.gguf.tensors[gguf_name(name)]
        if len(shape) == 2:
            total += t.nbytes if format_of_ggml(t.ggml_type) is not None else 2 * shape[0] * shape[1]
        else:
            total += 4 * shape[0]
    return total


def output_format(fmt: str) -> str:
    """The format of the embedding and lm_head when the layers are quantized to `fmt`."""
    return fmt if fmt in ("bf16", "q8_0") else "q8_0"


def problem(spec: ModelSpec, fmt: str) -> str | None:
    """Why `spec`'s matrices cannot be quantized to `fmt` (None: they can)."""
    if fmt not in QUANTIZABLE:
        return f"quantize={fmt!r} is not supported (supported: {', '.join(QUANTIZABLE)})"
    checks = ((fmt, spec.hidden_size, "hidden size"), (fmt, spec.num_heads * spec.head_dim, "attention width"),
              (fmt, spec.intermediate_size, "intermediate size"), (output_format(fmt), spec.hidden_size, "hidden size"))
    for f, cols, what in checks:
        p = shape_problem(f, cols)
        if p:
            return f"the {what} {cols} cannot be quantized to {f}: {p}"
    return None


def packed_bytes(spec: ModelSpec, fmt: str) -> int:
    """The bytes `KernelWeights.build(spec, dense, fmt)` holds (what the pool is charged for a quantized model)."""
    from .quant import FORMATS

    def mat(rows: int, cols: int, f: str) -> int:
        _, elems, nbytes = FORMATS[f]
        return rows * (cols // elems) * nbytes

    h, d, I = spec.hidden_size, spec.head_dim, spec.intermediate_size
    q, kv = spec.num_heads * d, spec.num_kv_heads * d
    out_fmt = output_format(fmt)
    layer = mat(q + 2 * kv, h, fmt) + mat(h, q, fmt) + mat(2 * I, h, fmt) + mat(h, I, fmt) + 4 * 2 * h
    if spec.attention_bias:
        layer += 4 * (q + 2 * kv) + (4 * h if spec.family in ("llama", "qwen3") else 0)
    if spec.qk_norm:
        layer += 4 * 2 * d
    heads = mat(spec.vocab_size, h, out_fmt) * (1 if spec.tie_word_embeddings else 2)
    return spec.num_layers * layer + heads + 4 * h


@dataclass
class KernelLayer:
    ln1: torch.Tensor
    ln2: torch.Tensor
    mats: dict[str, PackedMatrix]
    bqkv: torch.Tensor | None = None
    bo: torch.Tensor | None = None
    q_norm: torch.Tensor | None = None
    k_norm: torch.Tensor | None = None


@dataclass
class KernelWeights:
    """Per layer the seven matrices, norms (float32) and biases; the embedding, final norm and lm_head."""

    layers: list[KernelLayer]
    embed: PackedMatrix
    lm_head: PackedMatrix
    norm: torch.Tensor
    formats: set[str] = field(default_factory=set)
    buffer: torch.Tensor | None = None  # every matrix's bytes, once `place_in_one_buffer` has run

    def nbytes(self) -> int:
        mats = [self.embed] + ([] if self.lm_head is self.embed else [self.lm_head])
        total = sum(m.nbytes for m in mats) + self.norm.numel() * 4
        for L in self.layers:
            total += sum(m.nbytes for m in L.mats.values())
            for t in (L.ln1, L.ln2, L.bqkv, L.bo, L.q_norm, L.k_norm):
                total += 0 if t is None else t.numel() * 4
        return total

    def describe(self) -> str:
        """The formats held, e.g. "q4_0 + q8_0"."""
        return " + ".join(sorted(self.formats))

    @classmethod
    def build(cls, spec: ModelSpec, weights: dict, fmt: str | None = None) -> KernelWeights:
        """From a weight dict by Hugging Face name: dense tensors (packed as bfloat16, or quantized to `fmt`) or
        `PackedMatrix` values (kept as they are). Empties `weights` as it goes."""
        f32 = lambda t: None if t is None else t.detach().to(torch.float32).contiguous()  # noqa: E731

        def pack(w, out_fmt: str) -> PackedMatrix:
            if isinstance(w, PackedMatrix):
                return w
            return quantize(w.detach().cpu(), out_fmt)

        layer_fmt = fmt or "bf16"
        layers = []
        for i in range(spec.num_layers):
            pre = f"model.layers.{i}."
            w = lambda name: weights.pop(pre + name, None)  # noqa: E731
            mats = {k: pack(w(HF_NAMES[k]), layer_fmt) for k in LINEARS}
            biases = [w(f"self_attn.{p}_proj.bias") for p in "qkv"]
            bqkv = torch.cat([f32(b) for b in biases]) if all(b is not None for b in biases) else None
            layers.append(KernelLayer(
                ln1=f32(w("input_layernorm.weight")), ln2=f32(w("post_attention_layernorm.weight")), mats=mats,
                bqkv=bqkv, bo=f32(w("self_attn.o_proj.bias")), q_norm=f32(w("self_attn.q_norm.weight")),
                k_norm=f32(w("self_attn.k_norm.weight"))))
        out_fmt = output_format(layer_fmt)
        embed = pack(weights.pop("model.embed_tokens.weight"), out_fmt)
        lm = weights.pop("lm_head.weight", None)
        lm_head = embed if spec.tie_word_embeddings or lm is None else pack(lm, out_fmt)
        norm = f32(weights.pop("model.norm.weight"))
        weights.clear()
        formats = {m.format for L in layers for m in L.mats.values()} | {embed.format, lm_head.format}
        return cls(layers, embed, lm_head, norm, formats)

    def interleave_rows(self) -> bool:
        """Replace each quantized matrix by its copy with rows interleaved 8 at a time (`quant.interleave`;
        the embedding only where it is the lm_head, else it stays as it is for the lookup). Only where every matrix
        has rows in multiples of 8 (the kernel splits a group of matrices between threads in 8-row blocks);
        whether it did. The same bytes, so `nbytes` does not change; a GGUF file's matrices become copies, their
        file pages released once read (`release_file_pages`: the process holds their bytes once)."""
        mats = [m for L in self.layers for m in L.mats.values()] + [self.lm_head]
        if any(m.rows % 8 for m in mats) or not any(m.format in INTERLEAVED for m in mats):
            return False

        def swap(m: PackedMatrix) -> PackedMatrix:
            if m.format not in INTERLEAVED:
                return m
            out = interleave(m)
            if m.mapped:
                release_file_pages(m.data)
            return out

        for L in self.layers:
            L.mats = {k: swap(m) for k, m in L.mats.items()}
        tied = self.lm_head is self.embed
        self.lm_head = swap(self.lm_head)
        if tied:
            self.embed = self.lm_head
        return True

    def place_in_one_buffer(self) -> None:
        """Copy the matrices into one buffer (`host_bytes`: 2 MiB-aligned, huge pages where the OS gives them), in
        the order a forward reads them (each layer's q, k, v, o, gate, up, down; then the lm_head, and the embedding
        where it is apart), each at a 64-byte boundary; each original is dropped once copied and the freed memory
        given back to the OS layer by layer (`return_freed_memory`), so the resident bytes grow by at most about one
        layer. A GGUF file's mapped matrices (`mapped`), which every step streams, are copied too where that pays
        (`copying_file_pages_pays`: Linux), their file pages then released (`release_file_pages`: the process holds
        their bytes once); elsewhere they stay the file's bytes, as does an embedding apart from the lm_head (a
        step reads one row a token: its file pages are resident only where read). Once: a second call finds them
        placed. The same bytes, so `nbytes` does not change."""
        if self.buffer is not None:
            return
        move_mapped = copying_file_pages_pays()
        tied = self.lm_head is self.embed
        moves = lambda m, streamed=True: not m.mapped or (move_mapped and streamed)  # noqa: E731
        padded = lambda m: (m.nbytes + 63) // 64 * 64  # noqa: E731
        total = sum(padded(m) for m in [L.mats[k] for L in self.layers for k in LINEARS] + [self.lm_head] if moves(m))
        if not tied and moves(self.embed, streamed=False):
            total += padded(self.embed)
        self.buffer = buf = host_bytes(total)
        at = 0

        def place(m: PackedMatrix, streamed: bool = True) -> PackedMatrix:
            nonlocal at
            if not moves(m, streamed):
                return m
            data = buf[at:at + m.nbytes].view(m.data.shape)  # [rows, row_bytes], contiguous
            step = max(1, COPY_CHUNK_BYTES // m.row_bytes)
            for r in range(0, m.rows, step):  # a file's pages released as they are copied: the peak grows by a chunk
                data[r:r + step].copy_(m.data[r:r + step])
                if m.mapped:  # a read-only file mapping's bytes, copied: their pages out of the resident set
                    release_file_pages(m.data[r:r + step])
            at += padded(m)
            return PackedMatrix(m.format, m.rows, m.cols, data)

        for L in self.layers:
            for k in LINEARS:
                L.mats[k] = place(L.mats[k])  # the original freed here (nothing else holds it)
            return_freed_memory()  # a layer's originals back to the OS: the peak is the weights and one layer
        self.lm_head = place(self.lm_head)
        self.embed = self.lm_head if tied else place(self.embed, streamed=False)
        return_freed_memory()
        assert at == buf.numel()

    def dense(self, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """The same weights dequantized into `dtype`, by Hugging Face name (for the PyTorch path)."""
        out: dict[str, torch.Tensor] = {"model.embed_tokens.weight": self.embed.dequantize(dtype),
                                        "model.norm.weight": self.norm.to(dtype)}
        if self.lm_head is not self.embed:
            out["lm_head.weight"] = self.lm_head.dequantize(dtype)
        for i, L in enumerate(self.layers):
            pre = f"model.layers.{i}."
            for k in LINEARS:
                out[pre + HF_NAMES[k]] = L.mats[k].dequantize(dtype)
            out[pre + "input_layernorm.weight"] = L.ln1.to(dtype)
            out[pre + "post_attention_layernorm.weight"] = L.ln2.to(dtype)
            if L.bqkv is not None:
                q, kv = L.mats["q"].rows, L.mats["k"].rows
                for p, b in zip("qkv", L.bqkv.split([q, kv, kv])):
                    out[pre + f"self_attn.{p}_proj.bias"] = b.to(dtype)
            for name, t in (("self_attn.o_proj.bias", L.bo), ("self_attn.q_norm.weight", L.q_norm),
                            ("self_attn.k_norm.weight", L.k_norm)):
                if t is not None:
                    out[pre + name] = t.to(dtype)
        return out
