"""What each weight format costs in accuracy, on the real SmolLM2-135M-Instruct: MultiHead's fused kernel (bfloat16
K/V; activations int8 per 32-block for the quantized formats, as llama.cpp's, except in the scalar build, float32)
against the float32 reference on the same dequantized weights, and llama.cpp's own greedy tokens on the same
weights in the same format.

    python -m bench.accuracy [--formats bf16 q8_0 q5_0 q4_0 q4_1 q4_k_m] [--tokens 64] [--no-llama]
                             [--activations int8 float32] [--kv-cache bf16 int8] [--isa avx2] [--llama-isa avx2]

Per format: the reference is the PyTorch path in float32 on the checkpoint quantized to that format and dequantized
(for bf16, the checkpoint's bfloat16 values; for formats only llama.cpp makes, Q4_K_M, the GGUF file
`llama-quantize` writes, which both then load), so the numbers measure the kernel's own error, not the format's;
the format's own cost is the reference of that format against the bf16 reference (greedy agreement). For each
real chat prompt: the reference's greedy continuation of `--tokens` tokens; the kernel's logits at every position
of prompt + that continuation (teacher forced, one forward) against the reference's (relative L2 distance, largest
absolute difference, share of positions with the same argmax); the kernel's own free-running greedy tokens
against the reference's (share of positions equal); llama-server's greedy tokens (same prompt ids, `bench.llama_cpp`
files of the same weights) against the same reference. With `--kv-cache int8` also the kernel with the int8 K/V cache
(`kv_cache="int8"`), beside llama-server with its q8_0 K/V cache (`-fa on -ctk q8_0 -ctv q8_0`).
"""


from __future__ import annotations

import argparse

import torch

PROMPTS = [
    "Write a Python function that checks whether a string is a palindrome.",
    "Explain in three sentences why the sky is blue.",
    "List five tips for writing clear commit messages.",
    "What is the difference between a list and a tuple in Python?",
]


class Seq:
    """One sequence on its own pages of a runner's arena, fed in forwards of any length."""

    def __init__(self, runner, pages: int):
        self.runner, self.tpp = runner, runner.tokens_per_page
        self.table = list(range(pages))
        self.n = 0

    def forward(self, ids: list[int], all_logits: bool = False) -> torch.Tensor:
        from multihead_nb.backends.native import ForwardBatch

        t = lambda xs: torch.tensor(xs, dtype=torch.long)  # noqa: E731
        pos = list(range(self.n, self.n + len(ids)))
        slots = [self.table[p // self.tpp] * self.tpp + p % self.tpp for p in pos]
        self.n += len(ids)
        li = list(range(len(ids))) if all_logits else [len(ids) - 1]
        return self.runner.forward(ForwardBatch(t(ids), t(pos), t(slots), [len(ids)], [self.n], [self.table], t(li)))


def greedy(runner, pages: int, prompt: list[int], n: int) -> list[int]:
    s = Seq(runner, pages)
    out = [int(s.forward(prompt)[0].argmax())]
    while len(out) < n:
        out.append(int(s.forward([out[-1]])[0].argmax()))
    return out


def runner_for(spec, dtype, kernel: bool | str, fmt: str, tokens: int, activations: str | None = None,
               kv_cache: str | None = None):
    """A runner of `spec` in `fmt` (quantized at load; a GGUF spec as its file holds it); `kernel`: False (the
    PyTorch path), True (the best build this CPU runs) or a build's name ("avx2"); `kv_cache`: the runner's."""
    from multihead_nb.memory import Arena
    from multihead_nb.backends.native import ModelRunner

    page_bytes = 64 * 1024
    pages = spec.kv_layout(dtype, page_bytes, kv_cache).pages_for(tokens) + 1
    packed = fmt == "bf16" or spec.gguf is not None
    runner = ModelRunner(spec, Arena(pages, page_bytes), dtype=dtype, device="cpu", kernel=kernel,
                         quantize=None if packed else fmt, activations=activations, kv_cache=kv_cache)
    return runner, pages


def main(argv=None) -> None:
    from multihead_nb.backends.native.cpu_isa import ISAS

    from .llama_cpp import LLAMA_BUILDS

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--formats", nargs="+", default=["bf16", "q8_0", "q5_0", "q4_0", "q4_1", "q4_k_m"])
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-llama", action="store_true")
    ap.add_argument("--activations", nargs="+", default=["int8", "float32"], choices=["int8", "float32"],
                    help="the kernel's inputs to quantized products (a row each; bf16 has none)")
    ap.add_argument("--kv-cache", nargs="+", default=["bf16"], choices=["bf16", "int8"],
                    help="how the kernel keeps K/V (a row each, with the first activations)")
    ap.add_argument("--isa", choices=ISAS,
                    help="the kernel's build for this instruction set (default: the best this CPU runs)")
    ap.add_argument("--llama-isa", choices=list(LLAMA_BUILDS), default="native",
                    help="llama.cpp's build: native (this CPU's best) or avx2 (what an AVX2-only CPU builds)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from transformers import AutoTokenizer

    from multihead_nb.backends.native import read_spec
    from multihead_nb.backends.native.quant import QUANTIZABLE

    from . import llama_cpp, llama_gguf, llama_server
    from .real_model import real_checkpoint

    folder = real_checkpoint()
    spec = read_spec(folder)
    tok = AutoTokenizer.from_pretrained(str(folder))
    prompts = [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=True,
                                       return_dict=True)["input_ids"] for p in PROMPTS]
    total = max(len(p) for p in prompts) + args.tokens + 1
    tools = None if args.no_llama else llama_cpp.build(isa=args.llama_isa)
    if tools is None and any(f not in QUANTIZABLE for f in args.formats):
        print("without llama.cpp (--no-llama), leaving out what only llama-quantize makes:",
              ", ".join(f for f in args.formats if f not in QUANTIZABLE))
        args.formats = [f for f in args.formats if f in QUANTIZABLE]
    rows, base_tokens = [], None
    for fmt in args.formats:
        fspec = spec
        if fmt not in QUANTIZABLE:  # a format only llama.cpp makes: its GGUF file, for the reference and the kernel
            fspec = read_spec(str(llama_gguf.checkpoint_gguf(folder, fmt, tools)))
        ref, ref_pages = runner_for(fspec, torch.float32, False, fmt, total)
        fmt_same, ref_tokens_all = 0, []
        for i, p in enumerate(prompts):
            ref_tokens_all.append(greedy(ref, ref_pages, p, args.tokens))
            if base_tokens is not None:
                fmt_same += sum(x == y for x, y in zip(ref_tokens_all[i], base_tokens[i]))
        llama_same = {}  # K/V cache -> llama-server's greedy tokens equal to the reference's
        for kv in args.kv_cache if tools is not None else ():
            server = llama_server.LlamaServer(tools, llama_gguf.checkpoint_gguf(folder, fmt, tools), parallel=1,
                                             threads=args.threads, extra_args=llama_cpp.KV_CACHE_ARGS[kv])
            try:
                llama_same[kv] = sum(sum(x == y for x, y in zip(server.complete(p, args.tokens), r))
                                     for p, r in zip(prompts, ref_tokens_all))
            finally:
                server.close()
        n_pos = args.tokens * len(prompts)
        runs = [(acts, "bf16") for acts in (args.activations[:1] if fmt == "bf16" else args.activations)]
        runs += [(args.activations[0], kv) for kv in args.kv_cache if kv != "bf16"]
        for acts, kv in runs:
            ker, ker_pages = runner_for(fspec, torch.bfloat16, args.isa or True, fmt, total, acts, kv)
            dist, maxabs, argmax_same, free_same = 0.0, 0.0, 0, 0
            for p, ref_tokens in zip(prompts, ref_tokens_all):
                seq = p + ref_tokens[:-1]
                a = Seq(ref, ref_pages).forward(seq, all_logits=True)[len(p) - 1:]  # [tokens, V]
                b = Seq(ker, ker_pages).forward(seq, all_logits=True)[len(p) - 1:]
                dist += float(((b - a).norm(dim=-1) / a.norm(dim=-1)).sum())
                maxabs = max(maxabs, float((b - a).abs().max()))
                argmax_same += int((b.argmax(-1) == a.argmax(-1)).sum())
                free_same += sum(x == y for x, y in zip(greedy(ker, ker_pages, p, args.tokens), ref_tokens))
            rows.append((fmt, "-" if fmt == "bf16" else acts, kv, ker.fused.kernel.isa if ker.fused else "-",
                         dist / n_pos, maxabs, argmax_same / n_pos, free_same / n_pos,
                         llama_same[kv] / n_pos if kv in llama_same else None,
                         None if fmt == "bf16" or base_tokens is None else fmt_same / n_pos))
        if fmt == "bf16":
            base_tokens = ref_tokens_all
        print(f"{fmt}: done", flush=True)
    print()
    print(f"SmolLM2-135M-Instruct (the embedded Q4_1 weights in bfloat16), {len(prompts)} chat prompts x "
          f"{args.tokens} greedy tokens, {args.threads} threads")
    print()
    print("| format | activations | K/V cache | kernel build | logits: relative L2 distance to the float32 reference "
          "(mean) | largest absolute logit difference | same argmax (teacher forced) | greedy tokens equal: MultiHead "
          "kernel | greedy tokens equal: llama.cpp (int8 rows: its q8_0 K/V) | the format's reference vs bf16's |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    pct = lambda x: "-" if x is None else f"{100 * x:.1f}%"  # noqa: E731
    for fmt, acts, kv, isa, d, m, am, fr, ll, fs in rows:
        print(f"| {fmt} | {acts} | {kv} | {isa} | {d:.2e} | {m:.3f} | {pct(am)} | {pct(fr)} | {pct(ll)} | "
              f"{pct(fs)} |")


if __name__ == "__main__":
    main()
