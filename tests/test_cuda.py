"""The native runner and the engine on CUDA (skipped without a CUDA device): the same checks as on the CPU."""

import pytest
import torch

import multihead_nb as mh
from multihead_nb.memory import Arena, PagePool
from multihead_nb.backends.native import ForwardBatch, ModelRunner, read_spec

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.fixture(autouse=True)
def exact_matmuls():
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "mistral"])
def test_logits_match_transformers_on_cuda(tiny_ckpt, family):
    from transformers import AutoModelForCausalLM

    path = tiny_ckpt(family)
    spec = read_spec(str(path))
    arena = Arena(64, 8192, "cuda")
    runner = ModelRunner(spec, arena, dtype=torch.float32, device="cuda")
    pool = PagePool(64)
    ids = list(range(3, 40))
    tpp = runner.layout.tokens_per_page
    pages = pool.allocate(-(-len(ids) // tpp), "t", "m")
    dev = torch.device("cuda")
    batch = ForwardBatch(
        torch.tensor(ids, device=dev), torch.arange(len(ids), device=dev),
        torch.tensor([pages[i // tpp] * tpp + i % tpp for i in range(len(ids))], device=dev),
        [len(ids)], [len(ids)], [pages], torch.arange(len(ids), device=dev),
    )
    ours = runner.forward(batch)  # [T, vocab]
    ref = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).to(dev)
    with torch.no_grad():
        theirs = ref(torch.tensor([ids], device=dev)).logits[0].float()
    rel = (ours - theirs).abs().max() / theirs.abs().max()
    assert rel < 1e-4, rel


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_heads_together_equal_alone_on_cuda(tiny_ckpt, dtype):
    a = str(tiny_ckpt("llama"))
    b = str(tiny_ckpt("qwen2", num_hidden_layers=3, head_dim=8, num_attention_heads=8, num_key_value_heads=2))
    prompts = {"h1": "one two three", "h2": "the sea", "h3": "def f(x):", "h4": "colours"}

    def ws_():
        ws = mh.Workspace(device="cuda", dtype=dtype, pool="16MiB", page_bytes="8KiB", background=False)
        for h in ("h1", "h2", "h3"):
            ws.add_head(h, a, max_tokens=20, ignore_eos=True)
        ws.add_head("h4", b, max_tokens=20, ignore_eos=True)
        return ws

    ws = ws_()
    alone = {h: ws.generate(h, p).token_ids for h, p in prompts.items()}
    ws.close()
    ws = ws_()
    hs = {h: ws.submit(h, p) for h, p in prompts.items()}
    together = {h: x.result().token_ids for h, x in hs.items()}
    if dtype == "float32":
        assert together == alone
    else:  # batched bf16 kernels may round differently; most tokens agree
        agree = sum(x == y for h in prompts for x, y in zip(together[h], alone[h]))
        assert agree >= 0.75 * 20 * len(prompts)
    ws.pool.check()
    ws.close()


def test_team_on_cuda(tiny_ckpt):
    from multihead_nb.team.workflows import CODE

    ws = mh.Workspace(device="cuda", dtype="float32", pool="16MiB", page_bytes="8KiB", background=True)
    team = CODE.setup(ws, str(tiny_ckpt("llama")), max_tokens=16, ignore_eos=True)
    run = team.run(**CODE.variables)
    for head in ("reviewer", "documenter"):
        assert run.prompt_ids(head) == run.reference_prompt_ids(head)
    assert all(run.outputs.values())
    ws.close()
