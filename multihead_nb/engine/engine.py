"""The engine loop: schedule → run → postprocess, inline or on a background thread.

Owns: the step (turning a plan into one `ForwardBatch` per model, sampling, appending tokens, stop conditions,
finishing requests), the inbox through which other threads submit and cancel, the background thread, and the
listeners told of every token and every finish. Knows nothing of heads' prompts, chat templates, teams or
notebooks; the workspace builds requests, the bus listens.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass
from typing import Callable

import torch

from ..errors import RequestError
from ..backends.batch import ForwardBatch
from .output import IncrementalDetokenizer
from .recorder import Recorder
from .request import Request, Status
from .sampler import sample
from .plan import Chunk, StepPlan
from .scheduler import Scheduler


@dataclass
class ModelSlot:
    """What the engine needs of a loaded model."""

    runner: object  # has .forward(ForwardBatch) -> [L, vocab] logits, .layout, .device
    tokenizer: object
    eos_ids: frozenset[int]
    max_context: int


@dataclass
class StepOutput:
    sampled: dict[int, int]  # request id -> token id
    batch_sizes: dict[str, int]  # model -> sequences in its forward
    decode_tokens: dict[str, int]  # model -> tokens that were decode steps (the rest were prefill)
    forward_s: float


class Engine:
    def __init__(self, scheduler: Scheduler, recorder: Recorder, epoch: float):
        self.scheduler = scheduler
        self.recorder = recorder
        self.epoch = epoch
        self.models: dict[str, ModelSlot] = {}
        self.listeners: list[Callable[[str, Request, object], None]] = []
        self.step_count = 0
        self.tokens_generated = 0
        self.busy_s = 0.0
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._step_lock = threading.RLock()  # one step at a time, whoever drives
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._stop = False
        self.crashed: BaseException | None = None

    @property
    def lock(self):
        """Held for a whole step: hold it to change or read the scheduler and pool from another thread."""
        return self._step_lock

    def now(self) -> float:
        return time.perf_counter() - self.epoch

    # ---- requests in and out (any thread) ------------------------------------------------------------------
    def call_soon(self, fn: Callable[[], None]) -> None:
        """Run `fn` on the engine's side, before the next step's schedule."""
        self._inbox.put(fn)
        self._wake.set()

    def submit(self, req: Request) -> None:
        self.call_soon(lambda: self.scheduler.add(req))

    def cancel(self, req: Request, reason: str = "cancelled") -> None:
        self.call_soon(lambda: self._cancel_now(req, reason))

    def _cancel_now(self, req: Request, reason: str) -> None:
        if req.status.done:
            return
        self.scheduler.remove(req)
        req.status = Status.CANCELLED
        req.finish_reason = reason
        self._finish(req)

    def process_inbox(self) -> None:
        """Apply submitted adds and cancels now (inline mode; the background thread does this each step)."""
        with self._step_lock:
            self._drain_inbox()

    def _drain_inbox(self) -> None:
        while True:
            try:
                fn = self._inbox.get_nowait()
            except queue.Empty:
                return
            fn()

    # ---- the step ------------------------------------------------------------------------------------------
    def step(self) -> bool:
        """One engine step; returns whether any tokens were computed."""
        with self._step_lock:
            t0 = self.now()
            self._drain_inbox()
            plan = self.scheduler.schedule()
            t1 = self.now()
            try:
                out = self.run(plan)
            except Exception as e:  # a failed forward fails the requests in it, not the workspace
                self._fail_plan(plan, e)
                return True
            t2 = self.now()
            self.postprocess(plan, out)
            t3 = self.now()
            if plan.chunks:
                self._record_step(plan, out, t0, t1, t2, t3)
                self.step_count += 1
                self.busy_s += t3 - t0
            return bool(plan.chunks)

    def _fail_plan(self, plan: StepPlan, error: Exception) -> None:
        self._finish_failures(plan)
        for c in plan.chunks:
            req = c.request
            if req.status.done:
                continue
            self.scheduler.remove(req)
            req.status = Status.FAILED
            req.finish_reason = "error"
            req.error = RequestError(f"the forward pass of {req.model!r} failed: {type(error).__name__}: {error}")
            req.error.__cause__ = error
            self._finish(req)

    def run(self, plan: StepPlan) -> StepOutput:
        sampled: dict[int, int] = {}
        sizes: dict[str, int] = {}
        decodes: dict[str, int] = {}
        t = time.perf_counter()
        for model, chunks in plan.by_model().items():
            slot = self.models[model]
            batch, samplers = self._batch(chunks, slot.runner.layout.tokens_per_page, slot.runner.device)
            logits = slot.runner.forward(batch)  # [L, vocab]
            sizes[model] = batch.num_seqs
            decodes[model] = sum(1 for c in chunks if c.request.num_computed >= len(c.request.prompt_ids))
            if samplers:
                logits = logits.float().cpu()
                params = [c.request.params for c in samplers]
                gens = [c.request.generator for c in samplers]
                for c, tok in zip(samplers, sample(logits, params, gens)):
                    sampled[c.request.id] = tok
        return StepOutput(sampled, sizes, decodes, time.perf_counter() - t)

    @staticmethod
    def _batch(chunks: list[Chunk], tpp: int, device) -> tuple[ForwardBatch, list[Chunk]]:
        ids, pos, slots, qlens, clens, tables, logit_idx, samplers = [], [], [], [], [], [], [], []
        for c in chunks:
            r, start, n = c.request, c.request.num_computed, c.num_tokens
            ids.extend(r.token_slice(start, start + n))
            pos.extend(range(start, start + n))
            table = r.block_table
            slots.extend(table[p // tpp] * tpp + p % tpp for p in range(start, start + n))
            qlens.append(n)
            clens.append(start + n)
            tables.append(table[: -(-(start + n) // tpp)])
            if c.sample:
                logit_idx.append(len(ids) - 1)
                samplers.append(c)
        as_long = lambda xs: torch.tensor(xs, dtype=torch.long, device=device)  # noqa: E731
        batch = ForwardBatch(as_long(ids), as_long(pos), as_long(slots), qlens, clens, tables, as_long(logit_idx))
        return batch, samplers

    def _finish_failures(self, plan: StepPlan) -> None:
        for f in plan.failed:  # already out of the scheduler, pages freed
            f.request.status, f.request.finish_reason = Status.FAILED, "error"
            f.request.error = RequestError(f.message)
            self._finish(f.request)

    def postprocess(self, plan: StepPlan, out: StepOutput) -> None:
        self._finish_failures(plan)
        self.scheduler.advance(plan)
        t = self.now()
        for c in plan.chunks:
            req = c.request
            tok = out.sampled.get(req.id)
            if tok is None or req.status != Status.RUNNING:
                continue
            self._append_token(req, tok, t, out.batch_sizes[req.model])

    def _append_token(self, req: Request, tok: int, t: float, batch_size: int) -> None:
        slot = self.models[req.model]
        req.output_ids.append(tok)
        self.tokens_generated += 1
        if req.detokenizer is None:
            req.detokenizer = IncrementalDetokenizer(slot.tokenizer, req.prompt_ids)
        delta = req.detokenizer.push(tok)
        req.text += delta
        prev = req.last_token_time if req.last_token_time is not None else req.arrival
        if req.first_token_time is None:
            req.first_token_time = t
        req.last_token_time = t
        index = len(req.output_ids) - 1
        self.recorder.token(
            (req.head, req.id, index, tok, delta, t, t - prev, self.step_count, batch_size), req.tag
        )
        reason = None
        if tok in slot.eos_ids and not req.params.ignore_eos:
            reason = "stop"
        for s in req.params.stop:
            cut = req.text.find(s, max(0, len(req.text) - len(delta) - len(s)))
            if cut >= 0:
                req.text = req.text[:cut]
                reason = "stop"
                break
        if reason is None and len(req.output_ids) >= req.params.max_tokens:
            reason = "length"
        if reason is None and req.num_tokens >= slot.max_context:
            reason = "length"
        for listener in self.listeners:
            listener("token", req, tok)
        if reason is not None:
            self.scheduler.remove(req)
            req.status = Status.FINISHED
            req.finish_reason = reason
            self._finish(req)
        else:
            self._emit(req, hold_back=max((len(s) - 1 for s in req.params.stop), default=0))

    def _emit(self, req: Request, hold_back: int = 0) -> None:
        upto = max(req.emitted, len(req.text) - hold_back)
        if upto > req.emitted:
            req.deltas.put(req.text[req.emitted : upto])
            req.emitted = upto

    def _finish(self, req: Request) -> None:
        req.finish_time = self.now()
        self._emit(req)
        req.deltas.put(None)
        for listener in self.listeners:
            listener("finish", req, None)
        req.done_event.set()

    def _record_step(self, plan: StepPlan, out: StepOutput, t0, t1, t2, t3) -> None:
        usage_free = self.scheduler.pool.num_free
        in_use = self.scheduler.pool.num_pages - usage_free
        for model, chunks in plan.by_model().items():
            by_head: dict[str, int] = {}
            for c in chunks:
                by_head[c.request.head] = by_head.get(c.request.head, 0) + c.num_tokens
            decode = out.decode_tokens.get(model, 0)
            n = sum(c.num_tokens for c in chunks)
            self.recorder.step(
                (self.step_count, model, t0, t3, t3 - t0, len(chunks), n, n - decode, decode, by_head, in_use,
                 usage_free, t1 - t0, t2 - t1, t3 - t2)
            )

    # ---- driving -------------------------------------------------------------------------------------------
    def run_until(self, done: Callable[[], bool], timeout: float | None = None) -> None:
        """Drive steps in this thread until `done()` (inline mode), or wait for the background thread."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not done():
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError("the engine did not finish in time")
            if self.crashed is not None:
                raise RuntimeError(f"the engine thread stopped: {self.crashed!r}") from self.crashed
            if self._thread is not None:
                time.sleep(0.002)
                continue
            if not self.step() and self._inbox.empty() and not done():
                time.sleep(0.001)  # nothing runnable: waiting on an upstream stream or another thread

    def start_thread(self) -> None:
        if self._thread is not None:
            return
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="multihead-engine", daemon=True)
        self._thread.start()

    def stop_thread(self) -> None:
        self._stop = True
        self._wake.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=30)
        self._thread = None

    @property
    def background(self) -> bool:
        return self._thread is not None

    def _loop(self) -> None:
        while not self._stop:
            try:
                worked = self.step()
            except BaseException as e:  # a bug, not user input: keep it visible, stop serving
                self.crashed = e
                for req in self.scheduler.requests():
                    req.error = e
                    self._cancel_now(req, "error")
                raise
            if not worked:
                self._wake.wait(0.05)
                self._wake.clear()
