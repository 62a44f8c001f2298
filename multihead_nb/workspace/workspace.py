"""The kernel-resident workspace: one arena, its page pool, the loaded models, the heads, the engine and the bus.

Owns: the public Python API (`add_head`, `generate`, `submit`, `pages`, `stats`, frames, `close`) and the wiring
between floors: a head's definition becomes a model loaded through the registered backends (`models.py`) and a
queue in the scheduler, a prompt becomes token ids (`prompts.py`), a request a handle (`handles.py`); the page map
and usage numbers are `report.py`, building requests and changing open prompts `requests.py`, checking the
constructor's options `options.py`. Every request it accepts ends (finished, cancelled or failed): removing a head
or closing the workspace ends that head's (or every) request wherever it is, through the engine's one `finalize`.
Knows nothing of notebooks, teams or HTTP (`team()`, `dashboard()` and `serve()` reach up lazily).
"""

from __future__ import annotations

import sys
import threading
import time

import pandas as pd

from ..backends import default_backends
from ..backends.base import LoadTarget
from ..config import format_size
from ..engine.engine import Engine
from ..engine.recorder import Recorder
from ..engine.request import RequestIds
from ..engine.scheduler import Scheduler
from ..errors import ConfigError
from ..memory import Arena, PagePool
from .bus import Bus
from .handles import Completion, RequestHandle
from .heads import MODEL_OPTIONS, Head
from .models import LoadedModel, ModelTable
from .options import WorkspaceOptions
from .prompts import encode_prompt, render_prompt
from .report import page_frame, workspace_stats
from .requests import RequestFactory


class Workspace:
    """One device, one arena, many heads. `background=None` runs the engine on a thread inside a Jupyter kernel
    and inline (driven by `result()` / `stream()`) elsewhere. `history`: token rows (and bus messages) the
    workspace-wide logs keep, newest last; every request keeps its own rows whatever the logs dropped."""

    def __init__(
        self,
        device: str = "auto",
        pool: str | int = "1GiB",
        page_bytes: str | int = "256KiB",
        dtype: str = "auto",
        *,
        max_batched_tokens: int = 512,
        max_seqs: int = 128,
        background: bool | None = None,
        seed: int = 0,
        cpu_kernel: bool | str | None = None,
        history: int = 200_000,
    ):
        self.options = WorkspaceOptions.parse(device, pool, page_bytes, dtype, max_batched_tokens=max_batched_tokens,
                                              max_seqs=max_seqs, cpu_kernel=cpu_kernel, history=history)
        self.epoch = time.perf_counter()
        self.arena = Arena(self.options.num_pages, self.page_bytes, self.device)
        self.pool = PagePool(self.arena.num_pages)
        self.scheduler = Scheduler(self.pool, max_batched_tokens=max_batched_tokens, max_seqs=max_seqs)
        self.recorder = Recorder(max_steps=max(1, history // 4), max_tokens=history)
        self.engine = Engine(self.scheduler, self.recorder, self.epoch)
        self.models = ModelTable(self.pool, self.scheduler, self.engine,
                                 LoadTarget(self.arena, self.dtype, cpu_kernel), default_backends())
        self.backends = self.models.backends  # by name, in the order backend="auto" asks them; add your own
        self.heads: dict[str, Head] = {}
        self.bus = Bus(self.epoch, max_messages=history)
        self.engine.listeners.append(self.bus.on_engine_event)
        self._requests = RequestFactory(self.engine, seed)
        self._run_ids = RequestIds()
        self._lock = threading.RLock()  # the head table; held briefly
        self._load_lock = threading.RLock()  # one add/remove of a head at a time (loading takes seconds)
        self._closed = False
        self._arena_bytes = self.arena.nbytes
        if background is None:
            background = "ipykernel" in sys.modules
        if background:
            self.engine.start_thread()

    # read from the checked options (frozen): the arena, pool and models were built from them
    device = property(lambda self: self.options.device)
    dtype = property(lambda self: self.options.dtype)
    page_bytes = property(lambda self: self.options.page_bytes)
    cpu_kernel = property(lambda self: self.options.cpu_kernel)  # native models' fused CPU kernel: see ModelRunner

    # ---- models and heads ----------------------------------------------------------------------------------
    def add_head(self, name: str, model: str, system: str | None = None, *, replace: bool = False, **defaults) -> Head:
        """Define a head; heads naming the same model share one loaded copy of its weights."""
        self._check_open()
        head = Head.from_options(name, str(model), system, **defaults)
        with self._load_lock:
            if name in self.heads and not replace:
                raise ConfigError(f"a head named {name!r} already exists; remove_head({name!r}) first")
            options = {k: getattr(head, k) for k in MODEL_OPTIONS if k != "backend"}
            loaded = self.models.load(str(model), head.backend, options)
            loaded.heads.add(f"\0loading {name}")  # keeps the model while a head of the same name is replaced
            try:
                head.model = loaded.key
                quota_pages = self.models.quota_pages(head.quota, loaded)  # fails before an old head is replaced
                if name in self.heads:
                    self.remove_head(name)
                with self.engine.lock:
                    self.scheduler.add_head(name, loaded.key, weight=head.weight, quota_pages=quota_pages,
                                            max_concurrent=head.max_concurrent)
                with self._lock:
                    loaded.heads.add(name)
                    self.heads[name] = head
            finally:
                self.models.release(loaded, f"\0loading {name}")
        return head

    def remove_head(self, name: str) -> None:
        """End the head's requests (wherever they are: queued, running, not yet admitted), free their pages, and
        unload its model if no other head uses it."""
        with self._load_lock:
            with self._lock:
                head = self.head(name)
                del self.heads[name]  # from now on a submit to it is refused
            self.engine.call_soon(lambda: self.engine.cancel_all("cancelled", head=name))
            self.engine.sync()
            with self.engine.lock:  # a request that slipped in after the cancel: end it too
                for req in self.scheduler.remove_head(name):
                    self.engine.fail(req, f"head {name!r} was removed")
            self.engine.sync()
            self.models.release(self.models[head.model], name)

    def head(self, name: str) -> Head:
        """The head named `name`; a `ConfigError` listing the heads if there is none."""
        with self._lock:
            if name not in self.heads:
                known = ", ".join(sorted(self.heads)) or "none yet"
                raise ConfigError(f"unknown head {name!r}; heads: {known}")
            return self.heads[name]

    def _model_of(self, name: str) -> tuple[Head, LoadedModel]:
        with self._lock:
            h = self.head(name)
            return h, self.models[h.model]

    # ---- prompts -------------------------------------------------------------------------------------------
    def tokenizer(self, head: str):
        return self._model_of(head)[1].tokenizer

    def eos_ids(self, head: str) -> frozenset[int]:
        """The token ids that end a generation of `head`'s model."""
        return self._model_of(head)[1].built.eos_ids

    def render_prompt(self, head: str, prompt: str | list[dict]) -> str:
        """The text the model sees: the head's system prompt and the user turn through the chat template."""
        h, loaded = self._model_of(head)
        return render_prompt(loaded.tokenizer, h.system, prompt)

    def encode_prompt(self, head: str, prompt: str | list[dict]) -> list[int]:
        return encode_prompt(self.tokenizer(head), self.render_prompt(head, prompt))

    # ---- requests ------------------------------------------------------------------------------------------
    def submit(self, head: str, prompt: str | list[dict] | list[int], **overrides) -> RequestHandle:
        """Queue a generation and return at once; `.stream()`, `.result()`, `.cancel()` on the handle.

        `prompt` is the user turn (formatted with the head's system prompt by the chat template), a list of chat
        messages, or a list of token ids used as they are."""
        self._check_open()
        if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(t, int) for t in prompt):
            return self.submit_ids(head, list(prompt), **overrides)  # already token ids
        return self.submit_ids(head, self.encode_prompt(head, prompt), **overrides)

    def submit_ids(
        self, head: str, prompt_ids: list[int], *, prompt_open: bool = False, tag: dict | None = None, **overrides
    ) -> RequestHandle:
        """Queue a generation from token ids (an open prompt may grow; see `extend_prompt`)."""
        self._check_open()
        h, loaded = self._model_of(head)
        params = h.sampling.replace(**overrides)
        try:  # read without the step lock (a submit must not wait for a step); a removed head raises here
            capacity = self.scheduler.capacity(head)
        except KeyError:
            raise ConfigError(f"head {head!r} was removed") from None
        req = self._requests.build(head, loaded, prompt_ids, params, capacity=capacity, prompt_open=prompt_open,
                                   tag=tag)
        self.engine.submit(req)
        return RequestHandle(self.engine, req)

    def extend_prompt(self, handle: RequestHandle, ids: list[int], *, close: bool = False) -> None:
        """Append token ids to an open prompt (applied before the next step); `close=True` lets it start sampling."""
        req = handle.request
        self._requests.extend(req, ids, getattr(self.models[req.model].spec, "vocab_size", None), close)

    def truncate_prompt(self, handle: RequestHandle, num_tokens: int) -> None:
        """Cut an open prompt back to `num_tokens` ids (applied before the next step); its K/V past the cut is
        forgotten first, never rewriting a page another request may share."""
        self._requests.truncate(handle.request, num_tokens)

    def team(self, steps: dict):
        """A team of this workspace's heads: {head: template or Step}; see `multihead_nb.team`."""
        from ..team.team import Team

        self._check_open()
        return Team(self, steps)

    def serve(self, port: int = 8000, **options):
        """Serve this workspace's heads (and `teams=[...]`) over the OpenAI protocol on a thread beside the engine's;
        returns the running server (`.url`, `.stop()`). Options: host ("127.0.0.1"), teams, api_key, log_level;
        see `multihead_nb.server.app`."""
        from ..server.app import serve

        self._check_open()
        return serve(self, port=port, **options)

    def new_run_id(self) -> int:
        """A fresh id for a team run of this workspace."""
        return self._run_ids.next()

    def generate(self, head: str, prompt: str | list[dict] | list[int], **overrides) -> Completion:
        """Generate and wait: the blocking form of `submit(...).result()`."""
        return self.submit(head, prompt, **overrides).result()

    def now(self) -> float:
        """Seconds since the workspace started (the clock of every frame)."""
        return self.engine.now()

    def run_until(self, done, timeout: float | None = None) -> None:
        """Wait until `done()`: drive the engine in this thread (inline mode) or wait for its thread."""
        self.engine.run_until(done, timeout)

    def sync(self) -> None:
        """Return once every submit, cancel and prompt change made so far has reached the engine."""
        self.engine.sync()

    # ---- views ---------------------------------------------------------------------------------------------
    def pages(self) -> pd.DataFrame:
        """One row per page: page, state (free, cached, kv, weights), owner, holders, model, tokens, shared.

        A page of a region model's region (EXL2) is shown by the model's own pages charged to it: `kv` and held by
        the heads holding them, `cached`, or `free` (free for that model only; its `model` column names it)."""
        with self.engine.lock:
            return page_frame(self.pool, self.models)

    def stats(self) -> dict:
        """Pool usage, waste (allocated token slots not holding a token), queues per head, steps, tokens/s, models,
        the engine's recent errors and how much history the logs dropped."""
        with self.engine.lock:
            stats = workspace_stats(self.pool, self.models, self.engine, self.recorder, self.bus.dropped)
        return {"device": str(self.device), "dtype": str(self.dtype).replace("torch.", ""),
                "page_bytes": self.page_bytes, **stats}

    def steps(self) -> pd.DataFrame:
        """One row per engine step and model (columns documented in `multihead_nb.engine.recorder`)."""
        return self.recorder.steps()

    def tokens(self) -> pd.DataFrame:
        """One row per generated token, the newest `history` (columns documented in `multihead_nb.engine.recorder`)."""
        return self.recorder.tokens()

    def clear_prefix_cache(self) -> int:
        """Forget every cached prefix no request holds (e.g. between benchmark repetitions); returns the pages."""
        with self.engine.lock:
            return self.pool.evict_cached() + sum(m.region.pool.evict_cached() for m in self.models.values()
                                                   if m.region is not None)

    def clear_history(self) -> None:
        """Empty the workspace-wide token, step and bus logs (requests and team runs keep their own rows)."""
        self.recorder.clear()
        self.bus.clear_log()

    def dashboard(self, **options):
        """A live dashboard (page map, scheduler queues, token streams, timeline); static figures without widgets."""
        from ..notebook.widgets.dashboard import dashboard

        return dashboard(self, **options)

    # ---- lifecycle -----------------------------------------------------------------------------------------
    @property
    def closed(self) -> bool:
        """Whether `close()` has run: the workspace then holds no models, heads or arena."""
        return self._closed

    def _check_open(self) -> None:
        if self._closed:
            raise ConfigError("this workspace is closed; create a new one")

    def close(self) -> None:
        """End every request (wherever it is), stop the engine thread, and drop the models and the arena."""
        with self._load_lock:
            with self._lock:
                if self._closed:
                    return
                self._closed = True  # submits are refused from now on
            self.engine.stop_accepting()
            self.engine.call_soon(self.engine.cancel_all)
            self.engine.sync()
            self.engine.stop_thread()
            self.engine.call_soon(self.engine.cancel_all)  # anything accepted while the thread stopped
            self.engine.process_inbox()
            for loaded in list(self.models.values()):
                self.models.unload(loaded)
            self.heads.clear()
            self.models.target = None
            self.arena = None  # the arena's memory goes once no one else holds it

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"pages={self.pool.num_pages} x {format_size(self.page_bytes)}"
        return f"Workspace(device={self.device}, pool={format_size(self._arena_bytes)}, {state}, heads={sorted(self.heads)})"
