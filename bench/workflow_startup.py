"""Start-up of the workflow table: from a fresh process to the first token of the first head, for MultiHead,
transformers `generate` and transformers continuous batching (vllm's is measured by `vllm_peer.py`). Owns the
subprocess scripts and their timing; knows nothing of the other measurements.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

_STARTUP_MH = r"""
import os, sys, time
import torch
torch.set_num_threads(int(sys.argv[2]))
import multihead_nb as mh
from multihead_nb.team.workflows import CODE
ws = mh.Workspace(sys.argv[3], pool=sys.argv[4], page_bytes=sys.argv[5], dtype=sys.argv[6], background=False)
team = CODE.setup(ws, sys.argv[1], max_tokens=4, ignore_eos=True)
run = team.start(**CODE.variables)
ws.engine.run_until(lambda: ws.engine.tokens_generated > 0)
print("FIRST_TOKEN", flush=True)
"""

_HF_PRELUDE = r"""
import sys, time
import torch
torch.set_num_threads(int(sys.argv[2]))
from transformers import AutoModelForCausalLM, AutoTokenizer
from multihead_nb.team.workflows import CODE
dev = torch.device("cuda" if sys.argv[3] == "auto" and torch.cuda.is_available() else
                   ("cpu" if sys.argv[3] == "auto" else sys.argv[3]))
tok = AutoTokenizer.from_pretrained(sys.argv[1])
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=getattr(torch, sys.argv[6])).to(dev).eval()
msgs = [{"role": "system", "content": CODE.systems["coder"]},
        {"role": "user", "content": CODE.steps["coder"].format(**CODE.variables)}]
ids = tok(tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False), add_special_tokens=False,
          return_tensors="pt")["input_ids"].to(dev)
"""

_STARTUP_HF = _HF_PRELUDE + r"""
from transformers.generation.streamers import BaseStreamer

class First(BaseStreamer):
    def __init__(self):
        self.calls = 0
    def put(self, value):
        self.calls += 1
        if self.calls == 2:  # the first call carries the prompt
            print("FIRST_TOKEN", flush=True)
    def end(self):
        pass

model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, min_new_tokens=4, do_sample=False,
               streamer=First())
"""

# transformers continuous batching, configured as in the workflow table (workflow_systems.Bench.cb_manager)
_STARTUP_CB = _HF_PRELUDE + r"""
from transformers import GenerationConfig
from transformers.generation.configuration_utils import ContinuousBatchingConfig
gcfg = GenerationConfig(max_new_tokens=1, do_sample=False, eos_token_id=-1,
                        pad_token_id=model.generation_config.pad_token_id or 0)
cfg = ContinuousBatchingConfig(allow_block_sharing=False, max_batch_tokens=512,
                               **({"num_blocks": 128, "page_size": 64} if dev.type == "cpu" else {}))
mgr = model.init_continuous_batching(generation_config=gcfg, continuous_batching_config=cfg)
mgr.start()
mgr.add_request(ids[0].tolist(), max_new_tokens=1, eos_token_id=-1)
deadline = time.monotonic() + 240
while time.monotonic() < deadline:
    res = mgr.get_result(timeout=1.0)
    if res is not None and res.is_finished():
        if res.error is not None:
            raise SystemExit(f"request failed: {res.error}")
        print("FIRST_TOKEN", flush=True)
        break
mgr.stop(block=True, timeout=10)
"""

SCRIPTS = {"multihead": _STARTUP_MH, "transformers": _STARTUP_HF, "transformers_cb": _STARTUP_CB}


def startup_once(system: str, args, ckpt: Path, pool) -> float:
    src = SCRIPTS[system]
    cmd = [sys.executable, "-c", src, str(ckpt), str(args.threads), args.device, str(pool), args.page_bytes,
           args.dtype]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    t = math.nan
    for line in proc.stdout:
        if line.startswith("FIRST_TOKEN"):
            t = time.perf_counter() - t0
            break
    proc.stdout.close()
    _, err = proc.communicate(timeout=300)
    if proc.returncode != 0 or math.isnan(t):
        raise RuntimeError(f"{system} start-up subprocess failed ({proc.returncode}): {err[-400:]}")
    return t
