"""The fused CPU kernel (csrc/cpu_decode.c through fused_forward.py) against a float32 reference: the PyTorch path in
float32 on the same weights (dequantized where the kernel runs them quantized).

Every instruction-set build this CPU runs is checked (AVX-512, AVX2 + FMA, scalar C; NEON's products are checked
under qemu in test_kernel_formats.py, its whole forward in test_kernel_neon_forward.py): logits of every family over scattered small pages, decode steps, short and
long prefill chunks mixed, a sliding window, head dims and hidden sizes that are not multiples of the vector width,
quantized weights; a token's result does not depend on its batch-mates; the engine gives the same tokens for heads
together and alone; and the errors when the kernel cannot be used.
"""

from __future__ import annotations

import os
import random
from unittest import mock

import pytest
import torch

from multihead_nb.errors import ConfigError
from multihead_nb.memory import Arena
from multihead_nb.backends.native import ForwardBatch, ModelRunner, read_spec
from multihead_nb.backends.native.cpu_isa import DOUBLE_PUMPED, FLAGS_OFF_ENV, ISAS, cpu_features, cpu_isas
from multihead_nb.backends.native.cpu_kernel import DEFINES_ENV, _compiler, load_kernel
from multihead_nb.backends.native.fused_forward import FusedForward
from multihead_nb.backends.native.kernel_weights import KernelWeights
from multihead_nb.backends.native.quant import INTERLEAVED
from multihead_nb.backends.native.weight_files import load_weights

# Without a C compiler the kernel cannot exist and MultiHead uses its PyTorch path: skip, unless CI says a compiler
# must be there (.ci/run sets MULTIHEAD_REQUIRE_KERNEL=1 once it has installed one).
pytestmark = pytest.mark.skipif(_compiler() is None and not os.environ.get("MULTIHEAD_REQUIRE_KERNEL"),
                                reason="no C compiler here: the fused CPU kernel cannot be built")

BF16 = torch.bfloat16


def _builds() -> list[str]:
    """The builds this CPU runs, and on an AVX-512 BF16 CPU also its AVX-512 build without BF16 (the build of an
    AVX-512 CPU without it, Skylake-X to Ice Lake: attention's float32 multiply-adds, not vdpbf16ps); on an AVX-512
    VNNI CPU also its build with Q8_0's other tiles (`avx512-other-q8_0`: on Zen 4, whose builds take Q8_0's 256-bit
    decode tiles, the full-width CPUs' 512-bit ones, and elsewhere Zen 4's), so that both are tested anywhere."""
    isas = cpu_isas()
    feats = cpu_features()[1]
    if "avx512" in isas and "avx512_bf16" in feats:
        isas.insert(isas.index("avx512") + 1, "avx512-without-bf16")
    if "avx512" in isas and "avx512_vnni" in feats:
        isas.insert(isas.index("avx512") + 1, "avx512-other-q8_0")
    return isas


@pytest.fixture(scope="module", params=_builds())
def kernel(request):
    if request.param == "avx512-without-bf16":
        with mock.patch.dict(os.environ, {FLAGS_OFF_ENV: "avx512_bf16"}):
            built = load_kernel("avx512")
        assert "bf16" not in built.isa
        return built
    if request.param == "avx512-other-q8_0":
        other = {FLAGS_OFF_ENV: DOUBLE_PUMPED} if DOUBLE_PUMPED in cpu_features()[1] else {
            DEFINES_ENV: "MH_X8_Q8_YMM"}
        with mock.patch.dict(os.environ, other):
            built = load_kernel("avx512")
        assert built.path != load_kernel("avx512").path  # another library
        return built
    return load_kernel(request.param)


def runner_on(spec, arena, kernel, quantize=None, int8: bool = True, kv_cache: str = "bf16") -> ModelRunner:
    """A runner of `spec` whose forward is `kernel`'s build (whatever the default would pick); `int8`: quantized
    weights multiply int8 activations (else float32 ones); `kv_cache`: how its K/V are kept."""
    runner = ModelRunner(spec, arena, dtype=BF16, device="cpu", kernel=False, quantize=quantize)
    runner.layout = spec.kv_layout(BF16, arena.page_bytes, kv_cache)
    weights = KernelWeights.build(spec, load_weights(spec, torch.float32 if quantize else BF16), quantize)
    runner.fused = FusedForward(kernel, spec, weights, arena.data, runner.layout, arena.page_bytes, int8)
    runner.model = None
    return runner


class Pair:
    """A kernel runner and its float32 reference (the PyTorch path on the same, dequantized, weights), each in its
    own arena, sequences on shuffled pages."""

    def __init__(self, path, kernel, num_seqs: int, tokens_per_page: int = 3, pages_per_seq: int = 24,
                 quantize: str | None = None, int8: bool = True, kv_cache: str = "bf16"):
        spec = read_spec(path)
        self.spec = spec
        self.runners, self.arenas, self.tables = {}, {}, {}
        for name, dtype in (("kernel", BF16), ("ref", torch.float32)):
            bpt = spec.kv_layout(dtype, 1 << 20, kv_cache if name == "kernel" else None).bytes_per_token
            page_bytes = -(-bpt * tokens_per_page // 256) * 256  # arena pages are multiples of 256 bytes
            arena = Arena(2 * num_seqs * pages_per_seq, page_bytes, device="cpu")
            if name == "kernel":
                runner = runner_on(spec, arena, kernel, quantize, int8, kv_cache)
            else:
                runner = ModelRunner(spec, arena, dtype=dtype, device="cpu", kernel=False, quantize=quantize)
            assert tokens_per_page <= runner.tokens_per_page < 2 * tokens_per_page + 2  # several pages per sequence
            free = list(range(arena.num_pages))
            random.Random(0).shuffle(free)
            self.tables[name] = [[free.pop() for _ in range(pages_per_seq)] for _ in range(num_seqs)]
            self.runners[name], self.arenas[name] = runner, arena
        self.lens = [0] * num_seqs

    def step(self, tokens: list[list[int]]) -> dict[str, torch.Tensor]:
        """Feed `tokens[i]` to sequence i (empty: it sits this step out); logits of each fed sequence's last token."""
        out = {}
        for name, runner in self.runners.items():
            tpp = runner.tokens_per_page
            ids, pos, slots, ql, cl, tabs, li = [], [], [], [], [], [], []
            for i, toks in enumerate(tokens):
                if not toks:
                    continue
                start = self.lens[i]
                ps = range(start, start + len(toks))
                ids += toks
                pos += ps
                slots += [self.tables[name][i][p // tpp] * tpp + p % tpp for p in ps]
                ql.append(len(toks))
                cl.append(start + len(toks))
                tabs.append(self.tables[name][i])
                li.append(len(ids) - 1)
            t = lambda xs: torch.tensor(xs, dtype=torch.long)  # noqa: E731
            out[name] = runner.forward(ForwardBatch(t(ids), t(pos), t(slots), ql, cl, tabs, t(li)))
        for i, toks in enumerate(tokens):
            self.lens[i] += len(toks)
        return out

    def kv(self, name: str, seq: int) -> torch.Tensor:
        """The K/V of sequence `seq` as `name` wrote it: [n, 2, layers, KV, d] float32."""
        runner = self.runners[name]
        tpp, table = runner.tokens_per_page, self.tables[name][seq]
        lay = runner.layout
        if lay.int8:  # the int8 cache: each row's values times its scale
            raw = self.arenas[name].pages()[:, : lay.used_bytes]  # [P, used_bytes] uint8
            shape = (raw.shape[0], 2, lay.num_layers, tpp, lay.num_kv_heads, lay.head_dim // 32)
            scales = raw[:, lay.scales_offset:].contiguous().view(torch.float32).view(shape)
            values = raw[:, : lay.scales_offset].contiguous().view(torch.int8).view(*shape, 32)
            full = (values.float() * scales[..., None]).flatten(-2)
        else:
            full = lay.view(self.arenas[name])  # [P, 2, layers, tpp, KV, d]
        return torch.stack([full[table[p // tpp], :, :, p % tpp].float() for p in range(self.lens[seq])])


def assert_close(got: torch.Tensor, ref: torch.Tensor, tol: float = 0.03):
    """Agreement with the float32 reference: relative L2 error of the logits under `tol` (bfloat16 K/V, int8
    activations for quantized weights), and the same argmax on most rows."""
    err = (got - ref).norm() / ref.norm()
    assert err < tol, f"relative error {err:.4f}"
    return (got.argmax(-1) == ref.argmax(-1)).float().mean().item()


CASES = {
    "llama": ("llama", {}),
    "qwen2-bias": ("qwen2", {}),
    "qwen3-qk-norm": ("qwen3", {}),
    "mistral-window": ("mistral", {"sliding_window": 5}),
    "odd-sizes": ("llama", {"hidden_size": 72, "intermediate_size": 136, "num_attention_heads": 4,
                            "num_key_value_heads": 1}),  # head_dim 18: the ungrouped attention, masked tails
    "wide-group": ("llama", {"hidden_size": 96, "num_attention_heads": 12, "num_key_value_heads": 1}),  # G = 12
    "head-dim-48": ("llama", {"hidden_size": 96, "num_attention_heads": 2, "num_key_value_heads": 1}),  # x86: values
    # 32 columns at a time, then a 16-column tail; 2 heads of a group of 3
}


def run_greedy(pair: Pair, tol: float = 0.03) -> float:
    """Prompts, then greedy decode with the reference's tokens fed to both, a prefill chunk beside decode tokens
    and a sequence sitting a step out; checks every step's logits and at the end the K/V in the pages; returns the
    share of rows with the reference's argmax."""
    g = torch.Generator().manual_seed(1)
    V = pair.spec.vocab_size
    prompts = [torch.randint(3, V, (n,), generator=g).tolist() for n in (5, 4, 7)]
    out = pair.step(prompts)
    agree = [assert_close(out["kernel"], out["ref"], tol)]
    nxt = out["ref"].argmax(-1).tolist()
    for i in range(14):
        tokens = [[t] for t in nxt]
        if i == 3:
            tokens[0] += [11, 12, 13]  # a short prefill chunk beside decode tokens
        if i == 6:
            tokens[1] = []  # a sequence that sits a step out
        out = pair.step(tokens)
        agree.append(assert_close(out["kernel"], out["ref"], tol))
        fed = [j for j, t in enumerate(tokens) if t]
        for j, row in zip(fed, out["ref"].argmax(-1).tolist()):
            nxt[j] = row
    assert max(pair.lens) > 20
    for i in range(len(pair.lens)):  # the K/V the kernel wrote into its pages, position by position
        a, b = pair.kv("kernel", i), pair.kv("ref", i)
        assert (a - b).norm() / b.norm() < tol
    return sum(agree) / len(agree)


@pytest.mark.parametrize("case", list(CASES))
def test_kernel_matches_float32(tiny_ckpt, kernel, case):
    family, overrides = CASES[case]
    assert run_greedy(Pair(tiny_ckpt(family, **overrides), kernel, num_seqs=3)) > 0.9


@pytest.mark.parametrize("fmt", ["q8_0", "q5_0", "q5_1", "q4_0", "q4_1"])
def test_quantized_kernel_matches_float32(tiny_ckpt, kernel, fmt):
    """Weights quantized at load, kept packed in the kernel; the reference runs the same quantized values dequantized
    in float32, so what remains is the kernel's own error (int8 activations per 32 elements, bfloat16 K/V)."""
    pair = Pair(tiny_ckpt("qwen2"), kernel, num_seqs=3, quantize=fmt)
    weights = pair.runners["kernel"].fused.weights
    assert weights.formats == {fmt} | {"q8_0"}
    if kernel.reads_interleaved(True) and fmt in INTERLEAVED:  # x86: its rows run interleaved 8 at a time
        assert {m.format for L in weights.layers for m in L.mats.values()} == {INTERLEAVED[fmt]}
        assert weights.lm_head.format == "q8_0x8" and weights.embed is weights.lm_head  # tied: one copy
    assert run_greedy(pair, tol=0.05) > 0.85


def test_interleaving_needs_rows_in_eights(tiny_ckpt):
    """Rows are interleaved only where every matrix has them in multiples of 8 (the kernel splits a group of
    matrices between threads 8 rows at a time); the embedding of an untied model stays as it is for the lookup."""
    for vocab, tied, expect in ((389, True, False), (392, False, True)):
        spec = read_spec(tiny_ckpt("llama", vocab_size=vocab, tie_word_embeddings=tied))
        weights = KernelWeights.build(spec, load_weights(spec, torch.float32), "q4_0")
        before = weights.nbytes()
        assert weights.interleave_rows() is expect
        assert weights.nbytes() == before
        formats = {m.format for L in weights.layers for m in L.mats.values()} | {weights.lm_head.format}
        assert formats == ({"q4_0x8", "q8_0x8"} if expect else {"q4_0", "q8_0"})
        assert weights.embed.format == "q8_0"


def test_matrices_placed_in_one_buffer_in_forward_order(tiny_ckpt):
    """The kernel's matrices are copied into one buffer (huge pages where the OS gives them), each 64-byte aligned,
    in the order a forward reads them, their bytes unchanged; a second call changes nothing; tied stays tied."""
    from multihead_nb.backends.native.kernel_weights import LINEARS

    for tied in (True, False):
        spec = read_spec(tiny_ckpt("llama", vocab_size=392, tie_word_embeddings=tied))
        weights = KernelWeights.build(spec, load_weights(spec, torch.float32), "q4_0")
        weights.interleave_rows()
        order = [L.mats[k] for L in weights.layers for k in LINEARS] + [weights.lm_head]
        order += [] if tied else [weights.embed]
        before = [m.data.clone() for m in order]
        nbytes = weights.nbytes()
        weights.place_in_one_buffer()
        placed = [L.mats[k] for L in weights.layers for k in LINEARS] + [weights.lm_head]
        placed += [] if tied else [weights.embed]
        base = weights.buffer.data_ptr()
        offsets = [m.data.data_ptr() - base for m in placed]
        assert offsets == sorted(offsets) and offsets[0] == 0 and all(o % 64 == 0 for o in offsets)
        assert offsets[-1] + placed[-1].nbytes <= weights.buffer.numel()
        for m, old, new in zip(order, before, placed):
            assert (new.format, new.rows, new.cols) == (m.format, m.rows, m.cols) and torch.equal(new.data, old)
            assert new.data.untyped_storage().data_ptr() == weights.buffer.untyped_storage().data_ptr()
        assert (weights.embed is weights.lm_head) is tied and weights.nbytes() == nbytes
        weights.place_in_one_buffer()
        assert [m.data.data_ptr() for m in placed] == [L.mats[k].data.data_ptr() for L in weights.layers
                                                      for k in LINEARS] + [weights.lm_head.data.data_ptr()] + (
            [] if tied else [weights.embed.data.data_ptr()])


def test_long_prefill_matches_float32(tiny_ckpt, kernel):
    """A 200-token prompt in one forward (token rows in several blocks and tiles), then the same continued in
    chunks of 37 and 1 beside it: every length goes through the kernel."""
    pair = Pair(tiny_ckpt("llama"), kernel, num_seqs=2, tokens_per_page=16, pages_per_seq=20)
    g = torch.Generator().manual_seed(3)
    a = torch.randint(3, pair.spec.vocab_size, (200,), generator=g).tolist()
    b = torch.randint(3, pair.spec.vocab_size, (111,), generator=g).tolist()
    out = pair.step([a, []])
    assert_close(out["kernel"], out["ref"])
    for i in range(3):
        out = pair.step([[5 + i], b[37 * i: 37 * (i + 1)]])
        assert_close(out["kernel"], out["ref"])


@pytest.mark.parametrize("fmt", [None, "q4_0"])
def test_token_result_independent_of_batch(tiny_ckpt, kernel, fmt):
    """A dot product sums in the same order for any batch: one sequence alone or beside others, bit for bit."""
    path = tiny_ckpt("qwen2")
    alone = Pair(path, kernel, num_seqs=1, quantize=fmt)
    crowd = Pair(path, kernel, num_seqs=4, quantize=fmt, pages_per_seq=48)
    g = torch.Generator().manual_seed(2)
    prompt = torch.randint(3, 300, (6,), generator=g).tolist()
    others = [torch.randint(3, 300, (n,), generator=g).tolist() for n in (3, 60, 1)]
    a = alone.step([prompt])["kernel"]
    c = crowd.step([prompt] + others)["kernel"]
    assert torch.equal(a[0], c[0])
    for _ in range(8):
        t = a[0].argmax().item()
        a = alone.step([[t]])["kernel"]
        c = crowd.step([[t], [5], [6, 7, 8, 9, 10], [7]])["kernel"]
        assert torch.equal(a[0], c[0])


# Attention shapes: query heads per KV head (G) and head size (d) decide how a block's rows fill the vectors.
ATTENTION_SHAPES = {
    "G2-d16": ("llama", {}),
    "qwen3-G2-d16": ("qwen3", {}),
    "G8-d32": ("llama", dict(hidden_size=128, num_attention_heads=16, num_key_value_heads=2, head_dim=32)),
    "G1-d64": ("llama", dict(hidden_size=128, num_attention_heads=2, num_key_value_heads=2, head_dim=64)),
    "G3-d64": ("llama", dict(hidden_size=576, num_attention_heads=9, num_key_value_heads=3, head_dim=64)),
    "G4-d64": ("llama", dict(hidden_size=256, num_attention_heads=8, num_key_value_heads=2, head_dim=64)),
}


INT8_KV_SHAPES = ["G8-d32", "G1-d64", "G3-d64"]  # head sizes the int8 K/V cache takes (multiples of 32)


@pytest.mark.parametrize("shape", INT8_KV_SHAPES)
def test_int8_kv_cache_matches_float32(tiny_ckpt, kernel, shape):
    """kv_cache="int8": keys and values kept as int8 with a scale per row, read by the build's int8 attention
    (x86: its own tasks; other builds: the portable one). Greedy decode beside prompts, a prefill chunk among decode
    tokens, a sequence sitting a step out: the logits within 5% of the float32 reference at every step, the K/V in
    the pages (each int8 times its scale) within 5% of the reference's."""
    family, overrides = ATTENTION_SHAPES[shape]
    pair = Pair(tiny_ckpt(family, **overrides), kernel, num_seqs=3, kv_cache="int8")
    assert pair.runners["kernel"].layout.int8
    assert run_greedy(pair, tol=0.05) > 0.9


@pytest.mark.parametrize("fmt", [None, "q4_0"])
@pytest.mark.parametrize("shape", INT8_KV_SHAPES)
def test_int8_kv_cache_same_bits_in_any_batch_or_chunks(tiny_ckpt, kernel, shape, fmt):
    """With the int8 K/V cache a token's logits are the same bits alone or beside other sequences, and whether its
    prompt ran in one forward, in uneven chunks, or up to its last token (then a decode step)."""
    family, overrides = ATTENTION_SHAPES[shape]
    path = tiny_ckpt(family, **overrides)
    g = torch.Generator().manual_seed(5)
    prompt = torch.randint(3, 300, (150,), generator=g).tolist()
    alone = Pair(path, kernel, num_seqs=1, tokens_per_page=16, pages_per_seq=12, quantize=fmt, kv_cache="int8")
    crowd = Pair(path, kernel, num_seqs=3, tokens_per_page=16, pages_per_seq=12, quantize=fmt, kv_cache="int8")
    a = alone.step([prompt])["kernel"]
    c = crowd.step([prompt, prompt[:70], [7, 8, 9]])["kernel"]
    assert torch.equal(a[0], c[0])
    for _ in range(3):
        t = a[0].argmax().item()
        a = alone.step([[t]])["kernel"]
        c = crowd.step([[t], [5], [6, 7]])["kernel"]
        assert torch.equal(a[0], c[0])
    last = []
    for cuts in ((150,), (149, 1), (37, 80, 33)):
        pair = Pair(path, kernel, num_seqs=1, tokens_per_page=16, pages_per_seq=12, quantize=fmt, kv_cache="int8")
        start = 0
        for n in cuts:
            out = pair.step([prompt[start:start + n]])
            start += n
        last.append(out["kernel"][0])
    for other in last[1:]:
        assert torch.equal(last[0], other)


@pytest.mark.parametrize("weights", ["bf16", "q8_0-float32-inputs", "q8_0-int8-inputs", "q4_0-int8-inputs"])
@pytest.mark.parametrize("shape", list(ATTENTION_SHAPES))
def test_prefill_equals_decode_bit_for_bit(tiny_ckpt, kernel, shape, weights):
    """A prompt's last token has the same logits, bit for bit, whether the prompt runs in one forward (its tokens
    share attention tasks, a chunk of keys widened once for several of them), in uneven chunks, or up to its last
    token which then runs alone as a decode step: how tokens are grouped changes no sum. With Q8_0 weights taking
    float32 inputs every bit of an attention output reaches the logits (bfloat16 weights on AVX-512 BF16 round
    o_proj's inputs to bfloat16, which hides most one-bit differences); with int8 inputs the decode
    steps prepare o_proj's input in attention's merges, the prompt after them: the same int8, scales and sums."""
    family, overrides = ATTENTION_SHAPES[shape]
    quantize, int8 = {"bf16": (None, True), "q8_0-float32-inputs": ("q8_0", False),
                      "q8_0-int8-inputs": ("q8_0", True), "q4_0-int8-inputs": ("q4_0", True)}[weights]
    path = tiny_ckpt(family, **overrides)
    g = torch.Generator().manual_seed(4)
    prompt = torch.randint(3, 300, (150,), generator=g).tolist()
    last = []
    for cuts in ((150,), (149, 1), (37, 80, 33), (64, 1, 85)):
        pair = Pair(path, kernel, num_seqs=1, tokens_per_page=16, pages_per_seq=12, quantize=quantize, int8=int8)
        start = 0
        for n in cuts:
            out = pair.step([prompt[start:start + n]])
            start += n
        assert_close(out["kernel"], out["ref"])
        last.append(out["kernel"][0])
    for other in last[1:]:
        assert torch.equal(last[0], other)


def test_engine_heads_together_equal_alone_bf16(tiny_ckpt):
    """Through the workspace in bfloat16 (the kernel runs every step: all batches are short), greedy tokens of
    heads run together equal the heads run one by one."""
    import multihead_nb as mh

    path = tiny_ckpt("llama")
    prompts = {"a": [5, 9, 13, 2, 7], "b": [11, 4, 8], "c": [3, 3, 17, 21, 30, 6]}

    def workspace():
        ws = mh.Workspace(device="cpu", dtype="bfloat16", pool="16MiB", page_bytes="4KiB", background=False,
                          max_batched_tokens=16, cpu_kernel=True)
        for h in prompts:
            ws.add_head(h, str(path))
        assert ws.stats()["models"][str(path.resolve())]["cpu_kernel"]
        return ws

    ws = workspace()
    alone = {h: ws.generate(h, p, max_tokens=20, ignore_eos=True).token_ids for h, p in prompts.items()}
    ws.close()
    ws = workspace()
    handles = {h: ws.submit_ids(h, p, max_tokens=20, ignore_eos=True) for h, p in prompts.items()}
    together = {h: handles[h].result().token_ids for h in prompts}
    assert ws.steps().num_seqs.max() == 3
    ws.pool.check()
    ws.close()
    assert together == alone


def test_kernel_errors(tiny_ckpt, monkeypatch, tmp_path):
    import multihead_nb as mh

    with pytest.raises(ConfigError, match="cpu_kernel must be None .* instruction set's build .*'scalar'.* got 'yes'"):
        mh.Workspace(device="cpu", pool="4MiB", cpu_kernel="yes")
    # a workspace whose native models run one named build; a build this CPU cannot run refuses the model, unharmed
    path = tiny_ckpt("llama")
    with mh.Workspace(device="cpu", dtype="bfloat16", pool="16MiB", page_bytes="4KiB", background=False,
                      cpu_kernel="scalar") as ws:
        ws.add_head("a", str(path))
        assert "fused CPU kernel scalar" in ws.stats()["models"][str(path.resolve())]["runs_on"]
        assert len(ws.generate("a", [5, 9, 13], max_tokens=4, ignore_eos=True).token_ids) == 4
    missing = next(isa for isa in ISAS if isa not in cpu_isas())
    with mh.Workspace(device="cpu", dtype="bfloat16", pool="16MiB", page_bytes="4KiB", background=False,
                      cpu_kernel=missing) as ws:
        with pytest.raises(ConfigError, match=f"cannot run {missing}"):
            ws.add_head("a", str(path))
        assert ws.pool.num_free == ws.pool.num_pages and not ws.heads
    ws = mh.Workspace(device="cpu", dtype="float32", pool="16MiB", page_bytes="4KiB", background=False,
                      cpu_kernel=True)
    with pytest.raises(ConfigError, match="bfloat16 on the CPU"):
        ws.add_head("a", str(tiny_ckpt("llama")))
    assert ws.pool.num_free == ws.pool.num_pages and not ws.heads  # nothing charged, nothing left
    ws.close()
    spec = read_spec(tiny_ckpt("llama"))
    arena = Arena(16, 1 << 16, device="cpu")
    with pytest.raises(ConfigError, match="bfloat16 on the CPU"):
        ModelRunner(spec, arena, dtype=torch.float32, device="cpu", kernel=True)
    assert ModelRunner(spec, arena, dtype=torch.float32, device="cpu").fused is None
    # no compiler: the default quietly uses the PyTorch path and says why; requiring the kernel is an error
    monkeypatch.setenv("MULTIHEAD_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    runner = ModelRunner(spec, arena, dtype=BF16, device="cpu")
    assert runner.fused is None and "no-such-cc" in runner.kernel_note
    assert runner.model.layers[0].qkv.packed == runner.model.packed  # the PyTorch path keeps its packed weights
    with pytest.raises(ConfigError, match="required but is unavailable"):
        ModelRunner(spec, arena, dtype=BF16, device="cpu", kernel=True)
    # a CPU with neither AVX2 nor AVX-512 (the scalar build): PyTorch by default, the kernel only when asked for
    monkeypatch.delenv("CC")
    import multihead_nb.backends.native.runner as runner_module

    monkeypatch.setattr(runner_module, "load_kernel", lambda isa=None: load_kernel("scalar"))
    runner = ModelRunner(spec, arena, dtype=BF16, device="cpu")
    assert runner.fused is None and "scalar build is not faster" in runner.kernel_note
    forced = ModelRunner(spec, arena, dtype=BF16, device="cpu", kernel=True)
    assert forced.fused.kernel.isa == "scalar" and "fused CPU kernel scalar, weights bf16" == forced.kernel_note
    monkeypatch.undo()
    # the default on this CPU: the kernel where its AVX2 or AVX-512 build runs, and the note says which
    runner = ModelRunner(spec, arena, dtype=BF16, device="cpu")
    best = cpu_isas()[0]
    assert (runner.fused is not None) == (best in ("avx2", "avx512"))
    if runner.fused is not None:
        assert runner.kernel_note.startswith(f"fused CPU kernel {best}") and runner.model is None
    # an instruction set named: its build (to compare builds on one machine), or an error that says why not
    for isa in cpu_isas():
        named = ModelRunner(spec, arena, dtype=BF16, device="cpu", kernel=isa)
        assert named.fused.kernel.isa.startswith(isa) and named.kernel_note.startswith(f"fused CPU kernel {isa}")
    missing = next(isa for isa in ISAS if isa not in cpu_isas())  # NEON on x86, AVX2 on ARM
    with pytest.raises(ConfigError, match=f"required but is unavailable: this CPU .* cannot run {missing}"):
        ModelRunner(spec, arena, dtype=BF16, device="cpu", kernel=missing)
    with pytest.raises(ConfigError, match="kernel='avx9': expected True, False, None or one of 'avx512'"):
        ModelRunner(spec, arena, dtype=BF16, device="cpu", kernel="avx9")
    # quantizing: formats and shapes it cannot take are errors naming the problem; on float32 it runs dequantized
    with pytest.raises(ConfigError, match="q3_k"):
        ModelRunner(spec, arena, dtype=BF16, device="cpu", quantize="q3_k")
    odd = read_spec(tiny_ckpt("llama", hidden_size=72, intermediate_size=136, num_attention_heads=4,
                              num_key_value_heads=1))
    with pytest.raises(ConfigError, match="72 .*q8_0"):
        ModelRunner(odd, Arena(16, 1 << 16, device="cpu"), dtype=BF16, device="cpu", quantize="q8_0")
    f32 = ModelRunner(spec, arena, dtype=torch.float32, device="cpu", quantize="q8_0")
    assert f32.fused is None and f32.model is not None
    # a shape the kernel does not take: the PyTorch path, and the reason
    wide = read_spec(tiny_ckpt("llama", head_dim=520))
    runner = ModelRunner(wide, Arena(16, 1 << 20, device="cpu"), dtype=BF16, device="cpu")
    assert runner.fused is None and "head_dim 520" in runner.kernel_note
    with pytest.raises(ConfigError, match="head_dim 520"):
        ModelRunner(wide, Arena(16, 1 << 20, device="cpu"), dtype=BF16, device="cpu", kernel=True)


def test_compiler_without_openmp_builds_one_thread(tiny_ckpt, tmp_path, monkeypatch):
    """A C compiler without OpenMP (Apple's clang: "unsupported option '-fopenmp'") still builds the kernel, for one
    thread, with the same logits, bit for bit, as the build with OpenMP (threads split rows and tasks, never a sum).
    By default the runner keeps the PyTorch path and says why; cpu_kernel=True runs it and says it is one thread."""
    import stat

    real = _compiler()
    fake = tmp_path / "cc-without-openmp"
    fake.write_text('#!/bin/sh\nfor a in "$@"; do if [ "$a" = -fopenmp ]; then\n'
                    '  echo "clang: error: unsupported option \'-fopenmp\'" >&2; exit 1; fi; done\n'
                    f'exec "{real}" "$@"\n')
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    isa = cpu_isas()[0]
    threaded = load_kernel(isa)
    monkeypatch.setenv("MULTIHEAD_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", str(fake))
    single = load_kernel(isa)
    assert threaded.threaded and not single.threaded and single.isa == threaded.isa
    assert "unsupported option '-fopenmp'" in single.why_one_thread
    path = tiny_ckpt("llama")
    pairs = [Pair(path, k, num_seqs=3, quantize="q4_0") for k in (threaded, single)]
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, 300, (n,), generator=g).tolist() for n in (40, 7, 19)]
    outs = [p.step(prompts)["kernel"] for p in pairs]
    assert torch.equal(outs[0], outs[1])
    for i in range(4):  # decode steps at batch 3
        outs = [p.step([[5 + i], [9], [13 + i]])["kernel"] for p in pairs]
        assert torch.equal(outs[0], outs[1])
    spec = read_spec(path)
    runner = ModelRunner(spec, Arena(16, 1 << 16, device="cpu"), dtype=BF16, device="cpu")
    if isa in ("avx2", "avx512"):  # the builds used by default where threaded
        assert runner.fused is None and "would run on one thread: the C compiler has no OpenMP" in runner.kernel_note
        assert "cpu_kernel=True uses it anyway" in runner.kernel_note
    forced = ModelRunner(spec, Arena(16, 1 << 16, device="cpu"), dtype=BF16, device="cpu", kernel=True)
    assert forced.fused is not None and not forced.fused.kernel.threaded
    assert forced.kernel_note.endswith("one thread (the C compiler has no OpenMP)")


def test_kernel_refuses_out_of_range_ids_and_pages(tiny_ckpt, kernel):
    """The kernel checks what it would index (check_step: the embedding, the contexts, the arena, the logits rows)
    and refuses a batch that reads past them, nothing written, each with an error naming the problem; a block table
    shorter than its context is refused while it is copied. Then a good step still gives the reference's logits."""
    pair = Pair(tiny_ckpt("llama"), kernel, num_seqs=1)
    runner, V = pair.runners["kernel"], pair.spec.vocab_size
    t = lambda xs: torch.tensor(xs, dtype=torch.long)  # noqa: E731
    table = pair.tables["kernel"][0]
    tpp = runner.tokens_per_page
    arena = pair.arenas["kernel"].data
    before = arena.clone()
    with pytest.raises(IndexError, match="vocabulary"):
        runner.forward(ForwardBatch(t([3, V]), t([0, 1]), t([table[0] * tpp, table[0] * tpp + 1]), [2], [2], [table],
                                    t([1])))
    with pytest.raises(IndexError, match="vocabulary"):
        runner.forward(ForwardBatch(t([-1]), t([0]), t([table[0] * tpp]), [1], [1], [table], t([0])))
    far = pair.arenas["kernel"].num_pages
    with pytest.raises(IndexError, match="past the arena"):
        runner.forward(ForwardBatch(t([3]), t([0]), t([far * tpp]), [1], [1], [[far]], t([0])))
    with pytest.raises(IndexError, match="past the arena"):
        runner.forward(ForwardBatch(t([3]), t([0]), t([0]), [1], [1], [[-1]], t([0])))
    with pytest.raises(IndexError, match="logits indices"):
        runner.forward(ForwardBatch(t([3]), t([0]), t([table[0] * tpp]), [1], [1], [table], t([1])))
    with pytest.raises(IndexError, match="contexts"):  # a position past its sequence's context
        runner.forward(ForwardBatch(t([3]), t([5]), t([table[0] * tpp]), [1], [1], [table], t([0])))
    with pytest.raises(IndexError, match="block table of 1 pages"):
        runner.forward(ForwardBatch(t([3]), t([tpp]), t([table[0] * tpp]), [1], [tpp + 1], [table[:1]], t([0])))
    assert torch.equal(arena, before)  # nothing written
    out = pair.step([[3, 4]])  # and it still works
    assert_close(out["kernel"], out["ref"])


def test_workspace_quantize_at_load(tiny_ckpt):
    """`add_head(..., quantize="q4_0")` (a native backend option): the kernel keeps the blocks packed, the pool is
    charged exactly their packed size, heads of the model share it, asking for another format is an error, and
    greedy tokens match the same model run dequantized in float32 on the PyTorch path for most steps."""
    import multihead_nb as mh
    from multihead_nb.backends.native.kernel_weights import packed_bytes

    path = str(tiny_ckpt("qwen2"))
    key = str(tiny_ckpt("qwen2").resolve())
    kw = dict(device="cpu", pool="16MiB", page_bytes="4KiB", background=False)
    ws = mh.Workspace(dtype="bfloat16", cpu_kernel=True, **kw)
    ws.add_head("plain", path)
    dense_pages = ws.models[key].weight_pages
    ws.remove_head("plain")
    ws.add_head("a", path, quantize="q4_0")
    ws.add_head("b", path)  # no option: shares the quantized copy
    loaded = ws.models[key]
    held = loaded.runner.weight_nbytes()
    assert held == packed_bytes(loaded.spec, "q4_0") and loaded.weight_pages == -(-held // ws.page_bytes)
    assert loaded.weight_pages < dense_pages
    assert ws.stats()["models"][key]["runs_on"].startswith("fused CPU kernel") and "q4_0" in loaded.runner.kernel_note
    with pytest.raises(ConfigError, match="quantize='q4_0'.*quantize='q8_0'"):
        ws.add_head("c", path, quantize="q8_0")
    with pytest.raises(ConfigError, match="q5_k"):
        ws.add_head("d", str(tiny_ckpt("llama")), quantize="q5_k")
    got = ws.generate("a", [5, 9, 13, 2, 7], max_tokens=12, ignore_eos=True).token_ids
    ws.close()
    ref_ws = mh.Workspace(dtype="float32", cpu_kernel=False, **kw)
    ref_ws.add_head("a", path, quantize="q4_0")
    assert ref_ws.models[key].runner.fused is None  # float32: the PyTorch path, on the dequantized values
    ref = ref_ws.generate("a", [5, 9, 13, 2, 7], max_tokens=12, ignore_eos=True).token_ids
    ref_ws.close()
    assert sum(a == b for a, b in zip(got, ref)) >= 9


def prefill_logits(runner: ModelRunner, ids: list[int]) -> torch.Tensor:
    """Logits [len(ids), V] of one prefill of `ids` on pages 0.. of the runner's own arena."""
    tpp, n = runner.tokens_per_page, len(ids)
    t = lambda xs: torch.tensor(xs, dtype=torch.long)  # noqa: E731
    table = list(range(-(-n // tpp)))
    slots = [table[p // tpp] * tpp + p % tpp for p in range(n)]
    return runner.forward(ForwardBatch(t(ids), t(range(n)), t(slots), [n], [n], [table], t(range(n))))


def test_activations_option(tiny_ckpt):
    """`activations="float32"`: the kernel multiplies quantized weights with float32 inputs, ~10x closer to the
    float32 reference than the default int8 activations. As a head option (native backend) of a workspace: the
    kernel note says which; a head asking the other of a loaded model is an error naming both; an unknown value is
    an error."""
    import multihead_nb as mh

    path = tiny_ckpt("qwen2")
    spec = read_spec(str(path))
    prompt = [5, 9, 13, 2, 7, 11, 4, 8]
    ref = ModelRunner(spec, Arena(8, 1 << 17, device="cpu"), dtype=torch.float32, device="cpu", kernel=False,
                      quantize="q8_0")
    b = prefill_logits(ref, prompt)
    distance = {}
    for acts in ("int8", "float32"):
        runner = ModelRunner(spec, Arena(8, 1 << 16, device="cpu"), dtype=BF16, device="cpu", kernel=True,
                             quantize="q8_0", activations=acts)
        assert runner.kernel_note.endswith(f"{acts} activations")
        a = prefill_logits(runner, prompt)
        distance[acts] = float((a - b).norm() / b.norm())
    assert distance["float32"] < 0.01 < distance["int8"] < 0.1, distance

    kw = dict(device="cpu", pool="16MiB", page_bytes="4KiB", background=False)
    with mh.Workspace(dtype="bfloat16", cpu_kernel=True, **kw) as ws:
        ws.add_head("a", str(path), quantize="q8_0", activations="float32")
        with pytest.raises(ConfigError, match="activations='float32'.*activations='int8'"):
            ws.add_head("b", str(path), activations="int8")
        ws.add_head("c", str(path), activations="float32")  # the same choice shares the loaded model
        ws.remove_head("a"), ws.remove_head("c")
        ws.add_head("d", str(path), quantize="q8_0")
        assert ws.models[str(path.resolve())].runner.kernel_note.endswith("int8 activations")
        with pytest.raises(ConfigError, match="activations='int8'.*activations='float32'"):
            ws.add_head("e", str(path), activations="float32")
        with pytest.raises(ConfigError, match="activations='int4'"):
            ws.add_head("x", str(tiny_ckpt("llama")), activations="int4")


def test_kv_cache_option(tiny_ckpt):
    """`kv_cache="int8"` as a head option of a workspace: the kernel note says so, a page holds the int8 layout's
    tokens, requests run; a head asking the other cache of a loaded model is an error naming both; an unknown value,
    a head size the int8 cache cannot take, or a workspace whose models run on PyTorch are errors that name why."""
    import multihead_nb as mh

    path = tiny_ckpt(*ATTENTION_SHAPES["G3-d64"][:1], **ATTENTION_SHAPES["G3-d64"][1])
    spec = read_spec(str(path))
    kw = dict(device="cpu", pool="16MiB", page_bytes="64KiB", background=False)
    with mh.Workspace(dtype="bfloat16", cpu_kernel=True, **kw) as ws:
        ws.add_head("a", str(path), kv_cache="int8")
        model = ws.models[str(path.resolve())]
        assert model.runner.kernel_note.endswith("int8 K/V cache")
        assert model.built.layout.tokens_per_page == spec.kv_layout(BF16, 1 << 16, "int8").tokens_per_page
        assert model.built.layout.tokens_per_page > 1.7 * spec.kv_layout(BF16, 1 << 16).tokens_per_page
        assert len(ws.generate("a", [5, 9, 13, 2, 7], max_tokens=12, ignore_eos=True).token_ids) == 12
        with pytest.raises(ConfigError, match="kv_cache='int8'.*kv_cache='bf16'"):
            ws.add_head("b", str(path), kv_cache="bf16")
        with pytest.raises(ConfigError, match="kv_cache='fp8'"):
            ws.add_head("c", str(path), kv_cache="fp8")
        with pytest.raises(ConfigError, match="head_dim.*16"):
            ws.add_head("d", str(tiny_ckpt("llama")), kv_cache="int8")
        assert len(ws.generate("a", [5, 9], max_tokens=3, ignore_eos=True).token_ids) == 3  # still serving
    with mh.Workspace(dtype="float32", **kw) as ws:
        with pytest.raises(ConfigError, match="fused CPU kernel only.*float32"):
            ws.add_head("a", str(path), kv_cache="int8")
    with mh.Workspace(dtype="bfloat16", cpu_kernel=False, **kw) as ws:
        with pytest.raises(ConfigError, match="cpu_kernel=False"):
            ws.add_head("a", str(path), kv_cache="int8")
