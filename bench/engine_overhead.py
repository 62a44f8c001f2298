"""Engine overhead at batch 3, and 3 concurrent heads vs the same 3 requests one after another with `generate`.

    python -m bench.engine_overhead [--model-shape smollm2-135m] [--dtype bfloat16] [--quantize q4_0]
                                    [--prompt-tokens 128] [--new-tokens 128] [--reps 3] [--threads 2]
                                    [--device auto] [--quick]

One process, one random-weight checkpoint of the given shape (MultiHead's weights quantized at load with
`--quantize`; transformers runs the checkpoint as it is). Three heads on the same model each get a
`--prompt-tokens` prompt (random token ids, different per head) and produce exactly `--new-tokens` tokens
(`ignore_eos`). Interleaved per rep after a warm-up: (1) transformers `generate` on the three requests one after
another (greedy, `min_new_tokens = max_new_tokens`); (2) the three requests submitted to MultiHead at once and run
to the end (engine inline). Medians over reps.

(a) Engine overhead: on the MultiHead decode steps at batch 3 (three sequences, no prefill), the share of the step
    spent outside the model: schedule_s + postprocess_s (from the step frame) + batch building (`engine.forward.build_batch`,
    timed by wrapping it) over duration_s. Also shown: the runner's index metadata (`build_metadata`), the model
    forward itself, and sampling + the logits copy (the rest of `forward_s`).
(b) Aggregate tokens/s of the 3 concurrent heads over that of the 3 sequential `generate` calls (goal >= 2.5x).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

GOAL_OVERHEAD = 0.10
GOAL_RATIO = 2.5


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.engine_overhead", description=__doc__.split("\n")[0])
    p.add_argument("--model-shape", default="smollm2-135m")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--quantize", default=None, help="MultiHead's weights quantized at load (e.g. q4_0, q8_0)")
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--heads", type=int, default=3)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="auto")
    p.add_argument("--page-bytes", default="256KiB")
    p.add_argument("--quick", action="store_true", help="tiny checkpoint, few tokens, one rep")
    args = p.parse_args(argv)
    if args.quick:
        args.prompt_tokens, args.new_tokens, args.reps = 16, 8, 1
    return args


def main(argv=None) -> int:
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    import multihead_nb as mh
    from multihead_nb.config import resolve_device
    from multihead_nb.backends.native import read_spec
    from multihead_nb.backends.native import runner as runner_mod
    from multihead_nb.engine import forward as forward_mod
    from multihead_nb.testing import SHAPES, shape_checkpoint, tiny_checkpoint

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.quick:
        ckpt, shape = tiny_checkpoint("llama", dtype=args.dtype), "tiny-llama"
    elif args.model_shape in SHAPES:
        ckpt, shape = shape_checkpoint(args.model_shape, dtype=args.dtype), args.model_shape
    else:
        ckpt, shape = args.model_shape, args.model_shape
    device = resolve_device(args.device)
    dtype = getattr(torch, args.dtype)
    wbytes = read_spec(ckpt).weight_bytes(dtype)
    ws = mh.Workspace(device, pool=int(2.2 * wbytes) + (256 << 20), page_bytes=args.page_bytes, dtype=args.dtype,
                      background=False)
    key = str(ckpt)
    names = [f"h{i}" for i in range(args.heads)]
    for n in names:
        ws.add_head(n, key, max_tokens=args.new_tokens, ignore_eos=True,
                    **({"quantize": args.quantize} if args.quantize else {}))
    tok = ws.tokenizer(names[0])
    g = torch.Generator().manual_seed(0)
    lo, hi = 3, len(tok)  # past the special tokens, inside the trained vocabulary
    prompts = [torch.randint(lo, hi, (args.prompt_tokens,), generator=g).tolist() for _ in names]

    hf = AutoModelForCausalLM.from_pretrained(str(ckpt), dtype=dtype).to(device).eval()
    pad = hf.generation_config.pad_token_id if hf.generation_config.pad_token_id is not None else 0

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def run_hf(n_new):
        cfg = GenerationConfig(max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False,
                               eos_token_id=hf.generation_config.eos_token_id, pad_token_id=pad)
        out = 0
        sync()
        t = time.perf_counter()
        with torch.inference_mode():
            for p in prompts:
                ids = torch.tensor([p], device=device)
                out += hf.generate(ids, attention_mask=torch.ones_like(ids), generation_config=cfg).shape[1] - len(p)
        sync()
        return time.perf_counter() - t, out

    # timing wrappers (bench-only instrumentation; the engine calls these through attribute lookups)
    engine = ws.engine
    timers = {"batch": [], "meta": [], "model": []}
    batch_fn = forward_mod.build_batch

    def timed_batch(*a, **k):
        t = time.perf_counter()
        r = batch_fn(*a, **k)
        timers["batch"].append((engine.step_count, time.perf_counter() - t))
        return r

    meta_fn = runner_mod.build_metadata

    def timed_meta(*a, **k):
        t = time.perf_counter()
        r = meta_fn(*a, **k)
        sync()
        timers["meta"].append((engine.step_count, time.perf_counter() - t))
        return r

    slot = engine.models[key]
    fwd_fn = slot.runner.forward

    def timed_forward(batch):
        t = time.perf_counter()
        r = fwd_fn(batch)
        sync()
        timers["model"].append((engine.step_count, time.perf_counter() - t))
        return r


    def run_mh(n_new):
        ws.clear_prefix_cache()  # no prefix reuse across reps
        for v in timers.values():
            v.clear()
        first_step = engine.step_count
        t = time.perf_counter()
        hs = [ws.submit(n, p, max_tokens=n_new) for n, p in zip(names, prompts)]
        res = [h.result() for h in hs]
        wall = time.perf_counter() - t
        steps = ws.steps()
        steps = steps[steps.step >= first_step].drop_duplicates("step")
        return wall, sum(len(r.token_ids) for r in res), steps, {k: dict(v) for k, v in timers.items()}

    forward_mod.build_batch = timed_batch
    runner_mod.build_metadata = timed_meta
    slot.runner.forward = timed_forward
    try:
        run_hf(4)  # warm-up
        run_mh(4)
        hf_runs, mh_runs = [], []
        for rep in range(args.reps):
            hf_runs.append(run_hf(args.new_tokens))
            mh_runs.append(run_mh(args.new_tokens))
            print(f"rep {rep + 1}: generate x{args.heads} sequential {hf_runs[-1][0]:.2f} s, "
                  f"MultiHead {args.heads} concurrent {mh_runs[-1][0]:.2f} s", flush=True)
    finally:
        forward_mod.build_batch = batch_fn
        runner_mod.build_metadata = meta_fn
        del slot.runner.forward

    # (a) overhead on decode steps at batch == heads
    shares, parts = [], {k: [] for k in ("duration", "schedule", "postprocess", "batch", "meta", "model", "sample")}
    for wall, out, steps, tm in mh_runs:
        dec = steps[(steps.num_seqs == args.heads) & (steps.prefill_tokens == 0)]
        for _, s in dec.iterrows():
            b = tm["batch"].get(s.step, 0.0)
            m = tm["meta"].get(s.step, 0.0)
            f = tm["model"].get(s.step, 0.0)
            parts["duration"].append(s.duration_s)
            parts["schedule"].append(s.schedule_s)
            parts["postprocess"].append(s.postprocess_s)
            parts["batch"].append(b)
            parts["meta"].append(m)
            parts["model"].append(f - m)
            parts["sample"].append(s.forward_s - b - f)
            shares.append((s.schedule_s + s.postprocess_s + b) / s.duration_s)
    total = sum(parts["duration"])
    overhead = (sum(parts["schedule"]) + sum(parts["postprocess"]) + sum(parts["batch"])) / total
    med = {k: statistics.median(v) * 1e3 for k, v in parts.items()}

    hf_wall = statistics.median(w for w, _ in hf_runs)
    mh_wall = statistics.median(w for w, *_ in mh_runs)
    hf_tps = hf_runs[0][1] / hf_wall
    mh_tps = mh_runs[0][1] / mh_wall
    ratio = mh_tps / hf_tps

    print()
    fmt = args.dtype + (f", MultiHead in {args.quantize}" if args.quantize else "")
    print(f"Model {shape} ({fmt}), device {device}, {args.threads} threads, {args.heads} heads, "
          f"{args.prompt_tokens} prompt + {args.new_tokens} new tokens each, median of {args.reps} reps.")
    print()
    print(f"(a) engine overhead at batch {args.heads} ({len(parts['duration'])} decode steps): "
          f"{overhead:.1%} of step time (median per step {statistics.median(shares):.1%}); goal < "
          f"{GOAL_OVERHEAD:.0%}: {'met' if overhead < GOAL_OVERHEAD else 'MISSED'}")
    print()
    print("| part of a decode step | median ms |")
    print("|---|---|")
    for label, k in (("whole step (duration_s)", "duration"), ("schedule_s", "schedule"),
                     ("batch building (build_batch)", "batch"), ("postprocess_s", "postprocess"),
                     ("runner index metadata (build_metadata)", "meta"), ("model forward", "model"),
                     ("sampling + logits to CPU", "sample")):
        print(f"| {label} | {med[k]:.2f} |")
    print()
    print(f"(b) aggregate tokens/s: {args.heads} concurrent heads {mh_tps:.1f} tok/s ({mh_wall:.2f} s) vs "
          f"{args.heads} sequential generate {hf_tps:.1f} tok/s ({hf_wall:.2f} s): {ratio:.2f}x; goal >= "
          f"{GOAL_RATIO}x: {'met' if ratio >= GOAL_RATIO else 'MISSED'}")
    ws.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
