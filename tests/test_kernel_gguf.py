"""GGUF weights in the fused kernel: the file's blocks run as they are (no dequantized copy, llama-arch q/k rows
re-ordered as whole rows; on x86 with int8 activations a copy with rows interleaved 8 at a time), charged to the
pool at their packed size, against the float32 reference on the same file (the PyTorch path, dequantized)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

pytest.importorskip("multihead_nb.backends.native.gguf_file")

from multihead_nb.memory import Arena  # noqa: E402
from multihead_nb.backends.native import ForwardBatch, ModelRunner, read_spec  # noqa: E402
from multihead_nb.backends.native.cpu_kernel import _compiler  # noqa: E402
from multihead_nb.backends.native.kernel_weights import gguf_packed_bytes  # noqa: E402
from multihead_nb.backends.native.quant import INTERLEAVED, deinterleave  # noqa: E402
from multihead_nb.memory.host_bytes import copying_file_pages_pays  # noqa: E402
from multihead_nb.testing.gguf_checkpoints import write_gguf  # noqa: E402

pytestmark = pytest.mark.skipif(_compiler() is None and not os.environ.get("MULTIHEAD_REQUIRE_KERNEL"),
                                reason="no C compiler here: the fused CPU kernel cannot be built")


def run(runner, ids, pages, follow=None):
    """Logits of every position of `ids` (one prefill), then 6 decode steps fed the greedy tokens (or `follow`'s):
    ([positions, V] float32, the tokens fed)."""
    tpp, table, out, fed = runner.tokens_per_page, list(range(pages)), [], []
    t = lambda xs: torch.tensor(xs, dtype=torch.long)  # noqa: E731
    n, feed = 0, list(ids)
    for step in range(7):
        pos = list(range(n, n + len(feed)))
        slots = [table[p // tpp] * tpp + p % tpp for p in pos]
        n += len(feed)
        li = list(range(len(feed))) if step == 0 else [0]
        logits = runner.forward(ForwardBatch(t(feed), t(pos), t(slots), [len(feed)], [n], [table], t(li)))
        out.append(logits)
        feed = [int(logits[-1].argmax()) if follow is None else follow[step]]
        fed.append(feed[0])
    return torch.cat(out), fed


def _in_buffer(weights, m) -> bool:
    """Whether matrix `m`'s bytes lie in `weights`' one buffer (`place_in_one_buffer`)."""
    return m.data.untyped_storage().data_ptr() == weights.buffer.untyped_storage().data_ptr()


@pytest.mark.parametrize("family,weight_type", [("llama", "Q4_1"), ("llama", "Q8_0"), ("qwen2", "Q4_0"),
                                                ("qwen2", "Q5_0"), ("llama", "Q5_1"), ("llama", "F16")])
def test_gguf_blocks_run_packed(tiny_ckpt, tmp_path, family, weight_type):
    file = tmp_path / f"{family}-{weight_type}.gguf"
    write_gguf(tiny_ckpt(family), file, weight_type)
    spec = read_spec(str(file))
    kernel = ModelRunner(spec, Arena(8, 1 << 16, device="cpu"), dtype=torch.bfloat16, device="cpu", kernel=True)
    weights = kernel.fused.weights
    fmt = weight_type.lower()
    if fmt == "f16":  # not a format the kernel reads: those matrices converted to bfloat16
        assert "bf16" in weights.formats
    else:
        assert fmt in weights.formats
        t = spec.gguf.tensors["blk.0.ffn_down.weight"]
        m = weights.layers[0].mats["down"]
        if kernel.fused.kernel.reads_interleaved(True) and fmt in INTERLEAVED:  # x86, int8: 8 rows side by side
            assert m.format == INTERLEAVED[fmt] and np.array_equal(deinterleave(m).data.numpy().reshape(-1), t.raw)
            # a copy of the file's bytes: placed in the weights' one buffer (place_in_one_buffer)
            assert _in_buffer(weights, m)
        else:  # Q5_0 / Q5_1 (no interleaved layout), NEON, scalar: the file's blocks as they are
            assert m.format == fmt and np.array_equal(m.data.numpy().reshape(-1), t.raw)
            # copied into the one buffer (huge pages, the file's pages released) where that pays, else the file's own
            assert _in_buffer(weights, m) if copying_file_pages_pays() else m.data.data_ptr() == t.raw.ctypes.data
        # with float32 activations, a matrix that needs no re-ordering: the file's blocks, placed the same way
        f32 = ModelRunner(spec, Arena(8, 1 << 16, device="cpu"), dtype=torch.bfloat16, device="cpu", kernel=True,
                          activations="float32")
        m = f32.fused.weights.layers[0].mats["down"]
        assert np.array_equal(m.data.numpy().reshape(-1), t.raw)
        assert _in_buffer(f32.fused.weights, m) if copying_file_pages_pays() else m.data.data_ptr() == t.raw.ctypes.data
        if family == "llama":  # an embedding apart from the lm_head (read a row a token) stays the file's own bytes
            e = spec.gguf.tensors["token_embd.weight"]
            assert weights.embed is not weights.lm_head and weights.embed.data.data_ptr() == e.raw.ctypes.data
        else:  # tied: the embedding is the lm_head, streamed every step, placed with the layers
            assert weights.embed is weights.lm_head and _in_buffer(weights, weights.lm_head)
    assert kernel.weight_nbytes() == gguf_packed_bytes(spec)
    ref = ModelRunner(spec, Arena(8, 1 << 17, device="cpu"), dtype=torch.float32, device="cpu", kernel=False)
    ids = [5, 9, 13, 2, 7, 11, 4, 8, 3, 17]
    b, tokens = run(ref, ids, 8)
    a, _ = run(kernel, ids, 8, follow=tokens)
    assert (a - b).norm() / b.norm() < 0.03
    # the greedy token wherever the reference's leader is clear: the random model's near ties (margins down to
    # 0.004 of logits whose spread is ~2) flip on any rounding, and int8 activations move logits by up to ~0.25
    top2 = b.topk(2, -1).values
    clear = top2[:, 0] - top2[:, 1] > 0.25
    assert int(clear.sum()) >= 8
    assert torch.equal(a.argmax(-1)[clear], b.argmax(-1)[clear])


def test_gguf_model_in_a_workspace_is_charged_packed(tiny_ckpt, tmp_path):
    import multihead_nb as mh

    file = tmp_path / "llama-q4_0.gguf"
    write_gguf(tiny_ckpt("llama"), file, "Q4_0")
    ws = mh.Workspace(device="cpu", dtype="bfloat16", pool="16MiB", page_bytes="4KiB", background=False,
                      cpu_kernel=True)
    ws.add_head("a", str(file))
    loaded = next(iter(ws.models.values()))
    assert loaded.weight_pages == -(-gguf_packed_bytes(loaded.spec) // ws.page_bytes)
    assert "q4_0" in ws.stats()["models"][loaded.key]["runs_on"]
    assert len(ws.generate("a", [5, 9, 13], max_tokens=4, ignore_eos=True).token_ids) == 4
    ws.close()
