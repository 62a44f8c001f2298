"""The systems of the workflow table, in one process: MultiHead, transformers `generate` one after another, and
transformers continuous batching, each timed on a `Plan`.

Owns: `Bench` (one MultiHead workspace, the transformers model and the CB manager, created once and reused across
reps; each `*_row` runs one plan and returns its row), and the checkpoint choice (`resolve_checkpoint`). Knows
nothing of the command line, reps or output files (`workflow_table.py`) nor of vllm (`vllm_peer.py`).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from .workflow_workloads import Plan

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
            from multihead_nb.backends.native import read_spec

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

    # -- MultiHead
    def plan(self, wf) -> Plan:
        options = {"quantize": self.args.quantize} if getattr(self.args, "quantize", None) else {}
        team = wf.setup(self.ws, self.model_key, max_tokens=self.n, ignore_eos=True, **options)
        plan = Plan(wf.name, team, dict(wf.variables), list(team.order),
                    {i: [s for s in team.sources[i] if s is not None] for i in team.order})
        run = self.run_multihead(plan)[0]  # the warm-up, whose prompts the baselines reuse
        plan.prompts = {i: run.prompt_ids(i.head, i.round) for i in plan.order}
        return plan

    def run_multihead(self, plan: Plan):
        ws = self.ws
        ws.clear_prefix_cache()  # no prefix reuse across reps
        first = ws.engine.step_count
        t0 = time.perf_counter()
        run = plan.team.run(**plan.variables)
        wall = time.perf_counter() - t0
        steps = ws.steps()
        steps = steps[steps.step >= first].drop_duplicates("step")
        waste = [(s, h) for s, h in zip(steps.kv_slots, steps.kv_tokens) if s]  # (slots, held) per step
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
