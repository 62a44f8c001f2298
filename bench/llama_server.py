"""llama.cpp's server as the peer a user would run: a `llama-server -np N` process on loopback, driven over HTTP
with token-id prompts, a fixed `n_predict` and `ignore_eos` (`LlamaServer`), and its decode step at batch 1 and 3
from its own timings (`server_steps`).

Owns: starting the process on a free port, waiting for `/health`, one greedy `/completion` (its tokens or its
`timings`), stopping the process. Knows nothing of building llama.cpp (`llama_cpp.py` hands over the binaries), of
GGUF files (`llama_gguf.py`), of MultiHead, or of the workflow table's plans (`llama_server_peer.py`).
"""

from __future__ import annotations

import json
import socket
import subprocess
import time
import urllib.request
from pathlib import Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LlamaServer:
    """`llama-server -m MODEL -np N -t T -c CTX [extra args]` on loopback; `complete(ids, n)` -> generated token
    ids."""

    def __init__(self, tools, model: Path, parallel: int = 3, threads: int = 2, ctx_per_slot: int = 2048,
                 extra_args: tuple[str, ...] = ()):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [str(tools["llama-server"]), "-m", str(model), "-np", str(parallel), "-t", str(threads),
               "-c", str(ctx_per_slot * parallel), "--host", "127.0.0.1", "--port", str(self.port),
               "--no-webui", "-cb", *extra_args]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"llama-server exited: {self.proc.stderr.read()[-2000:]}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.3)
        self.close()
        raise RuntimeError("llama-server did not become healthy in 120 s")

    def _complete(self, prompt_ids: list[int], n_predict: int, cache_prompt: bool = False) -> dict:
        """One greedy `/completion` of `n_predict` tokens (no early end; no prompt cache unless `cache_prompt`): the
        server's reply."""
        body = {"prompt": prompt_ids, "n_predict": n_predict, "ignore_eos": True, "cache_prompt": cache_prompt,
                "temperature": 0.0, "top_k": 1, "samplers": ["top_k"], "return_tokens": True, "stream": False}
        req = urllib.request.Request(self.url + "/completion", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=600) as r:
            return json.loads(r.read())

    def complete(self, prompt_ids: list[int], n_predict: int) -> list[int]:
        return list(self._complete(prompt_ids, n_predict).get("tokens") or [])

    def timed(self, prompt_ids: list[int], n_predict: int, cache_prompt: bool = False) -> dict:
        """One completion's `timings` as llama-server reports them (`predicted_per_token_ms`, `prompt_ms`,
        `prompt_n`, ...)."""
        timings = self._complete(prompt_ids, n_predict, cache_prompt).get("timings") or {}
        if timings.get("predicted_n") != n_predict:
            raise RuntimeError(f"llama-server predicted {timings.get('predicted_n')} tokens, not {n_predict}")
        return timings

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def server_steps(tools, model: Path, threads: int, prompts: list[list[int]], gen: int,
                 extra_args: tuple[str, ...] = ()) -> tuple[float, float]:
    """llama.cpp's decode step at batch 1 and at batch 3, in seconds: `llama-server -np 3` decoding `gen` tokens after
    `prompts[0]` alone, then after each of the three `prompts` at once (started together, so the three decode in the
    same steps; the median of the three requests' time per token). The three prompts are first sent once each (one
    token predicted, `cache_prompt`), so that each lies in a slot's cache and the timed requests decode only (at
    most a few prompt tokens evaluated, checked); `extra_args` go to llama-server. Unwarmed, three 1024-token
    prompts (more than one 2048-token batch) were prefilled in turn while the first slots decoded, and those steps
    counted as decode (Q5_0 on a Zen 2: 93-102 ms a step, against 43 in a pair where the prompts happened to
    align)."""
    from concurrent.futures import ThreadPoolExecutor

    assert len(prompts) == 3
    with LlamaServer(tools, model, parallel=3, threads=threads, extra_args=extra_args) as srv:
        srv.timed(prompts[0][:16], 4)  # warm-up
        alone = srv.timed(prompts[0], gen)["predicted_per_token_ms"]
        with ThreadPoolExecutor(3) as pool:
            list(pool.map(lambda p: srv.timed(p, 1, cache_prompt=True), prompts))  # each prompt into a slot's cache
            timed = list(pool.map(lambda p: srv.timed(p, gen, cache_prompt=True), prompts))
    if max(t["prompt_n"] for t in timed) > 8:
        raise RuntimeError(f"llama-server prefilled {[t['prompt_n'] for t in timed]} prompt tokens in the timed "
                           "batch-3 requests: its slots did not keep the prompts")
    three = sorted(t["predicted_per_token_ms"] for t in timed)
    return alone / 1e3, three[1] / 1e3
