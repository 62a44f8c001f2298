"""The fused CPU kernel (models/cpu_decode.c through fused_forward.py) against the PyTorch path, in bfloat16.

Both SIMD builds are checked (AVX-512 BF16 where the CPU has it, and the portable C one): logits of every family
over scattered small pages, decode and short prefill chunks mixed, a sliding window, head dims and hidden sizes
that are not multiples of the vector width; a token's result does not depend on its batch-mates; the engine gives
the same tokens for heads together and alone; and the errors when the kernel cannot be used.
"""

from __future__ import annotations

import os
import random

import pytest
import torch

from multihead_nb.errors import ConfigError
from multihead_nb.memory import Arena
from multihead_nb.backends.native import ForwardBatch, ModelRunner, read_spec
from multihead_nb.backends.native.cpu_kernel import _compiler, load_kernel

# Without a C compiler the kernel cannot exist and MultiHead uses its PyTorch path: skip, unless CI says a compiler
# must be there (.ci/run sets MULTIHEAD_REQUIRE_KERNEL=1 once it has installed one).
pytestmark = pytest.mark.skipif(_compiler() is None and not os.environ.get("MULTIHEAD_REQUIRE_KERNEL"),
                                reason="no C compiler here: the fused CPU kernel cannot be built")

BF16 = torch.bfloat16


@pytest.fixture(scope="module", params=["native", "portable"])
def kernel(request):
    k = load_kernel(("-DMH_PORTABLE",) if request.param == "portable" else ())
    if request.param == "portable":
        assert k.simd == "portable"
    return k


class Pair:
    """A kernel runner and a PyTorch-path runner of one model, sequences on disjoint shuffled pages of one arena."""

    def __init__(self, path, kernel, num_seqs: int, tokens_per_page: int = 3, pages_per_seq: int = 24):
        spec = read_spec(path)
        bpt = spec.kv_layout(BF16, 1 << 20).bytes_per_token
        page_bytes = -(-bpt * tokens_per_page // 256) * 256  # arena pages are multiples of 256 bytes
        self.arena = Arena(2 * num_seqs * pages_per_seq, page_bytes, device="cpu")
        from multihead_nb.backends.native.fused_forward import FusedForward

        self.torch = ModelRunner(spec, self.arena, dtype=BF16, device="cpu", kernel=False)
        plain = ModelRunner(spec, self.arena, dtype=BF16, device="cpu", kernel=False, packed=False)
        plain.fused = FusedForward(kernel, plain.model, self.arena.data, plain.layout, self.arena.page_bytes)
        self.runners = {"kernel": plain, "torch": self.torch}
        assert tokens_per_page <= plain.tokens_per_page < 2 * tokens_per_page  # several pages per sequence
        free = list(range(self.arena.num_pages))
        random.Random(0).shuffle(free)
        self.tables = {k: [[free.pop() for _ in range(pages_per_seq)] for _ in range(num_seqs)] for k in self.runners}
        self.lens = [0] * num_seqs
        self.spec = spec

    def step(self, tokens: list[list[int]]) -> dict[str, torch.Tensor]:
        """Feed `tokens[i]` to sequence i (empty: it sits this step out); logits of each fed sequence's last token."""
        tpp = self.torch.tokens_per_page
        out = {}
        for name, runner in self.runners.items():
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
            batch = ForwardBatch(t(ids), t(pos), t(slots), ql, cl, tabs, t(li))
            if name == "kernel":
                assert runner.fused.supports(batch)
            out[name] = runner.forward(batch)
        for i, toks in enumerate(tokens):
            self.lens[i] += len(toks)
        return out


def assert_close(got: torch.Tensor, ref: torch.Tensor):
    """bfloat16 agreement: relative L2 error of the logits under 3%, and the same argmax on most rows."""
    err = (got - ref).norm() / ref.norm()
    assert err < 0.03, f"relative error {err:.4f}"
    return (got.argmax(-1) == ref.argmax(-1)).float().mean().item()


CASES = {
    "llama": ("llama", {}),
    "qwen2-bias": ("qwen2", {}),
    "qwen3-qk-norm": ("qwen3", {}),
    "mistral-window": ("mistral", {"sliding_window": 5}),
    "odd-sizes": ("llama", {"hidden_size": 72, "intermediate_size": 136, "num_attention_heads": 4,
                            "num_key_value_heads": 1}),  # head_dim 18: the ungrouped attention, masked tails
}


@pytest.mark.parametrize("case", list(CASES))
def test_kernel_matches_torch_path(tiny_ckpt, kernel, case):
    family, overrides = CASES[case]
    pair = Pair(tiny_ckpt(family, **overrides), kernel, num_seqs=3)
    g = torch.Generator().manual_seed(1)
    V = pair.spec.vocab_size
    prompts = [torch.randint(3, V, (n,), generator=g).tolist() for n in (5, 4, 7)]  # 16 tokens: one kernel batch
    out = pair.step(prompts)
    agree = [assert_close(out["kernel"], out["torch"])]
    nxt = out["torch"].argmax(-1).tolist()
    for i in range(14):  # greedy decode, the torch path's tokens fed to both; chunks and idle sequences mixed in
        tokens = [[t] for t in nxt]
        if i == 3:
            tokens[0] += [11, 12, 13]  # a short prefill chunk beside decode tokens
        if i == 6:
            tokens[1] = []  # a sequence that sits a step out
        out = pair.step(tokens)
        agree.append(assert_close(out["kernel"], out["torch"]))
        fed = [j for j, t in enumerate(tokens) if t]
        for j, row in zip(fed, out["torch"].argmax(-1).tolist()):
            nxt[j] = row
    assert max(pair.lens) > 20 and sum(agree) / len(agree) > 0.9
    # the K/V the kernel wrote into its pages matches the torch path's, position by position
    tpp = pair.torch.tokens_per_page
    full = pair.torch.layout.view(pair.arena)  # [P, 2, layers, tpp, KV, d]
    for i, n in enumerate(pair.lens):
        pk = [full[pair.tables["kernel"][i][p // tpp], :, :, p % tpp].float() for p in range(n)]
        pt = [full[pair.tables["torch"][i][p // tpp], :, :, p % tpp].float() for p in range(n)]
        a, b = torch.stack(pk), torch.stack(pt)
        assert (a - b).norm() / b.norm() < 0.03


def test_token_result_independent_of_batch(tiny_ckpt, kernel):
    """A dot product sums in the same order for any batch: one sequence alone or beside others, bit for bit."""
    path = tiny_ckpt("qwen2")
    alone, crowd = Pair(path, kernel, num_seqs=1), Pair(path, kernel, num_seqs=4)
    g = torch.Generator().manual_seed(2)
    prompt = torch.randint(3, 300, (6,), generator=g).tolist()
    others = [torch.randint(3, 300, (3,), generator=g).tolist() for _ in range(3)]
    a = alone.step([prompt])["kernel"]
    c = crowd.step([prompt] + others)["kernel"]
    assert torch.equal(a[0], c[0])
    for _ in range(8):
        t = a[0].argmax().item()
        a = alone.step([[t]])["kernel"]
        c = crowd.step([[t], [5], [6], [7]])["kernel"]
        assert torch.equal(a[0], c[0])


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

    with pytest.raises(ConfigError, match="cpu_kernel"):
        mh.Workspace(device="cpu", pool="4MiB", cpu_kernel="yes")
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
    # a CPU without AVX-512 BF16 (the portable build): PyTorch by default, the kernel only when asked for
    monkeypatch.delenv("CC")
    import multihead_nb.backends.native.runner as runner_module

    monkeypatch.setattr(runner_module, "load_kernel", lambda: load_kernel(("-DMH_PORTABLE",)))
    runner = ModelRunner(spec, arena, dtype=BF16, device="cpu")
    assert runner.fused is None and "AVX-512 BF16" in runner.kernel_note
    assert ModelRunner(spec, arena, dtype=BF16, device="cpu", kernel=True).fused.kernel.simd == "portable"
    monkeypatch.undo()
    # a shape the kernel does not take: the PyTorch path, and the reason
    wide = read_spec(tiny_ckpt("llama", head_dim=520))
    runner = ModelRunner(wide, Arena(16, 1 << 20, device="cpu"), dtype=BF16, device="cpu")
    assert runner.fused is None and "head_dim 520" in runner.kernel_note
    with pytest.raises(ConfigError, match="head_dim 520"):
        ModelRunner(wide, Arena(16, 1 << 20, device="cpu"), dtype=BF16, device="cpu", kernel=True)


def test_kernel_refuses_out_of_range_ids_and_pages(tiny_ckpt, kernel):
    """The C code indexes the embedding and the arena unchecked: the Python side refuses what would read past them."""
    pair = Pair(tiny_ckpt("llama"), kernel, num_seqs=1)
    runner, V = pair.runners["kernel"], pair.spec.vocab_size
    t = lambda xs: torch.tensor(xs, dtype=torch.long)  # noqa: E731
    table = pair.tables["kernel"][0]
    tpp = runner.tokens_per_page
    with pytest.raises(IndexError, match="vocabulary"):
        runner.forward(ForwardBatch(t([3, V]), t([0, 1]), t([table[0] * tpp, table[0] * tpp + 1]), [2], [2], [table],
                                    t([1])))
    far = pair.arena.num_pages + 5
    with pytest.raises(IndexError, match="past the arena"):
        runner.forward(ForwardBatch(t([3]), t([0]), t([far * tpp]), [1], [1], [[far]], t([0])))
    out = pair.step([[3, 4]])  # and it still works
    assert_close(out["kernel"], out["torch"])
