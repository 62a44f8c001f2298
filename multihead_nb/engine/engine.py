"""The engine loop: schedule → run → postprocess, inline or on a background thread, and every request's end.

Owns: the step; the inbox through which other threads submit and cancel; the live requests (from `submit` to their
end, wherever they are: inbox, waiting, running, preempted); `finalize`, the one place a request ends (its final
status, its pages freed, its stream closed, its listeners told); the background thread; the listeners told of every
token and every end, called after the step, outside its lock. A step is safe against Ctrl-C in inline mode: the
parts that change shared state run with the interrupt held back (`interrupts_deferred`), and an interrupt during
the forward leaves every request as it was before the step. An exception in a step fails the requests it concerns;
the engine keeps serving and keeps the cause in `errors`.

Knows nothing of heads' prompts, chat templates, teams or notebooks; the workspace builds requests, the bus listens.
Running a plan's forwards and sampling is `forward.py`; detokenizing and stops `output.py`; policy `scheduler.py`;
the step log's rows `step_rows.py`.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from typing import Callable

from ..errors import MultiHeadError, RequestError
from .forward import ModelSlot, StepOutput, run_plan
from .interrupts import interrupts_deferred
from .output import append_token, emit
from .plan import StepPlan
from .recorder import Recorder, TokenRow
from .request import Request, Status
from .scheduler import Scheduler
from .step_rows import step_rows
from . import sources

__all__ = ["Engine", "ModelSlot"]

Listener = Callable[[str, Request, object], None]  # ("token", req, TokenRow) or ("finish", req, None)


class Engine:
    def __init__(self, scheduler: Scheduler, recorder: Recorder, epoch: float):
        self.scheduler = scheduler
        self.recorder = recorder
        self.epoch = epoch
        self.models: dict[str, ModelSlot] = {}
        self.listeners: list[Listener] = []
        self.step_count = 0
        self.tokens_generated = 0
        self.busy_s = 0.0
        self.errors: deque[tuple[float, str]] = deque(maxlen=100)  # (time, what failed and why), newest last
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._step_lock = threading.RLock()  # one step at a time, whoever drives
        self._live: dict[int, Request] = {}
        self._live_lock = threading.Lock()
        self._accepting = True
        self._events: list[tuple[str, Request, object]] = []  # told to listeners after the step
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
        """Accept `req`: from now on it ends, one way or another (`finalize`), whatever happens to its head."""
        with self._live_lock:
            if not self._accepting:
                raise RequestError("the workspace is closed; create a new one")
            self._live[req.id] = req
        self.call_soon(lambda: self._admit(req))

    def stop_accepting(self) -> None:
        """Refuse every later `submit` (the workspace is closing)."""
        with self._live_lock:
            self._accepting = False

    def cancel(self, req: Request, reason: str = "cancelled") -> None:
        self.call_soon(lambda: self.finalize(req, Status.CANCELLED, reason))

    def live_requests(self) -> list[Request]:
        """Every request submitted and not yet ended, wherever it is."""
        with self._live_lock:
            return list(self._live.values())

    def process_inbox(self) -> None:
        """Apply submitted adds and cancels now (inline mode; the background thread does this each step)."""
        with self._step_lock, interrupts_deferred():
            self._drain_inbox()
        self._deliver()

    def sync(self, timeout: float = 60.0) -> None:
        """Return once everything queued before this call is applied and its listeners and handles are told."""
        if self._thread is None or self._thread is threading.current_thread():
            self.process_inbox()
            return
        done = threading.Event()
        self.call_soon(lambda: self._events.append(("barrier", None, done)))
        if not done.wait(timeout):
            raise RuntimeError(f"the engine thread did not respond within {timeout:g} s")

    # ---- the one end of every request (engine side) --------------------------------------------------------
    def finalize(self, req: Request, status: Status, reason: str, error: BaseException | None = None) -> None:
        """End `req` (once): take it out of the scheduler and free its pages, set its final status, close its
        stream; listeners hear of it after the step and then its handle wakes."""
        if req.status.done:
            return
        assert status.done, status
        self.scheduler.remove(req)
        sources.stop(self, req)  # a stream source's request: close its stream
        req.status, req.finish_reason, req.error = status, reason, error
        req.finish_time = self.now()
        emit(req, final=True)
        req.deltas.put(None)
        with self._live_lock:
            self._live.pop(req.id, None)
        self._events.append(("finish", req, None))

    def fail(self, req: Request, message: str, cause: BaseException | None = None) -> None:
        err = RequestError(message)
        err.__cause__ = cause
        self.finalize(req, Status.FAILED, "error", err)

    def cancel_all(self, reason: str = "cancelled", head: str | None = None) -> list[Request]:
        """Engine side: end every live request (of `head`, if given) wherever it is; returns them."""
        ended = [r for r in self.live_requests() if head is None or r.head == head]
        for r in ended:
            self.finalize(r, Status.CANCELLED, reason)
        return ended

    def _admit(self, req: Request) -> None:
        if req.status.done:  # cancelled while in the inbox
            return
        try:
            if not sources.start(self, req):  # a stream source's requests bypass the scheduler
                self.scheduler.add(req)
        except MultiHeadError as e:
            self.fail(req, str(e))

    def _drain_inbox(self) -> None:
        while True:
            try:
                fn = self._inbox.get_nowait()
            except queue.Empty:
                return
            try:
                fn()
            except Exception as e:  # one bad callback must not stop the engine
                self._record_error("an engine callback", e)

    def _deliver(self) -> None:
        """Tell listeners of the last step's tokens and ends (outside the step lock), then wake finished handles."""
        with self._step_lock:
            events, self._events = self._events, []
        if not events:
            return
        with interrupts_deferred():
            for kind, req, payload in events:
                if kind == "barrier":
                    payload.set()
                    continue
                for listener in self.listeners:
                    try:
                        listener(kind, req, payload)
                    except Exception as e:
                        self._record_error(f"a listener of request {req.id}", e)
                if kind == "finish":
                    req.done_event.set()

    def _record_error(self, where: str, e: BaseException) -> None:
        self.errors.append((self.now(), f"{where} raised {type(e).__name__}: {e}"))

    # ---- the step ------------------------------------------------------------------------------------------
    def step(self) -> bool:
        """One engine step; returns whether any tokens were computed."""
        try:
            with self._step_lock:
                return self._step()
        finally:
            self._deliver()

    def _step(self) -> bool:
        t0 = self.now()
        with interrupts_deferred():
            self._drain_inbox()
            try:
                plan = self.scheduler.schedule()
            except Exception as e:  # a bug in planning: end what it concerns (everything queued), keep serving
                self._record_error("the scheduler", e)
                for r in self.scheduler.requests():
                    self.fail(r, f"the scheduler failed: {type(e).__name__}: {e}", e)
                return False
            for failure in plan.failed:
                self.fail(failure.request, failure.message)
        t1 = self.now()
        out = run_plan(self.models, plan)  # an interrupt here leaves every request as it was before the step
        t2 = self.now()
        with interrupts_deferred():
            self.postprocess(plan, out)
            t3 = self.now()
            if plan.chunks:
                for row in step_rows(self.step_count, plan, out, self.scheduler, self.models, t0, t1, t2, t3):
                    self.recorder.step(row)
                self.step_count += 1
                self.busy_s += t3 - t0
            arrived = sources.poll(self)  # tokens from stream sources (remote engines)
        return bool(plan.chunks) or arrived > 0

    def postprocess(self, plan: StepPlan, out: StepOutput) -> None:
        for c in plan.chunks:
            if c.request.id in out.failed:
                self.fail(c.request, out.failed[c.request.id], out.causes.get(c.request.id))
        self.scheduler.advance(plan)
        t = self.now()
        for c in plan.chunks:
            req = c.request
            tok = out.sampled.get(req.id)
            if tok is None or req.status != Status.RUNNING:
                continue
            try:
                self._append_token(req, tok, t, out.batch_sizes[req.model])
            except Exception as e:  # a bug in one request's output handling ends that request only
                self.fail(req, f"handling the output of request {req.id} failed: {type(e).__name__}: {e}", e)

    def _append_token(self, req: Request, tok: int, t: float, batch_size: int) -> None:
        slot = self.models[req.model]
        delta, reason = append_token(req, tok, slot.tokenizer, slot.eos_ids, slot.max_context)
        self.tokens_generated += 1
        prev = req.last_token_time if req.last_token_time is not None else req.arrival
        if req.first_token_time is None:
            req.first_token_time = t
        req.last_token_time = t
        row = TokenRow(req.head, req.id, len(req.output_ids) - 1, tok, delta, t, t - prev, self.step_count, batch_size)
        req.token_rows.append(row)
        self.recorder.token(row, req.tag)
        self._events.append(("token", req, row))
        if reason is not None:
            self.finalize(req, Status.FINISHED, reason)
        else:
            emit(req)

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

    def wake(self) -> None:
        """Make an idle engine thread step now (a stream source got something)."""
        self._wake.set()

    @property
    def background(self) -> bool:
        return self._thread is not None

    @property
    def on_engine_thread(self) -> bool:
        return self._thread is not None and self._thread is threading.current_thread()

    def _loop(self) -> None:
        while not self._stop:
            try:
                worked = self.step()
            except Exception as e:  # steps contain their failures; this is a bug outside them: record, go on
                self._record_error("an engine step", e)
                worked = False
            except BaseException as e:  # SystemExit and the like: stop serving, end every request visibly
                self.crashed = e
                with self._step_lock:
                    for req in self.live_requests():
                        self.finalize(req, Status.FAILED, "error", RequestError(f"the engine thread stopped: {e!r}"))
                self._deliver()
                raise
            if not worked:
                self._wake.wait(0.05)
                self._wake.clear()
