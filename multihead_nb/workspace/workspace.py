"""The kernel-resident workspace: one arena, its page pool, the loaded models, the heads, the engine and the bus.

Owns: the public Python API (`add_head`, `generate`, `submit`, `pages`, `stats`, frames) and the wiring between
layers (model loading and weight accounting are `loading.py`, chat templates `prompts.py`, the page map and usage
numbers `usage.py`): a head's quota becomes pages, a prompt becomes token ids. `backends` names the region backends heads may ask for (`exl2`). Knows nothing of
notebooks (the magics and widgets sit on top of it).
"""

from __future__ import annotations

import random
import sys
import threading
import time

import pandas as pd
import torch

from ..config import format_size, parse_pages, parse_size, resolve_device, resolve_dtype
from ..engine.engine import Engine
from ..engine.recorder import Recorder
from ..engine.request import Request, RequestIds, check_token_ids
from ..engine.scheduler import Scheduler
from ..errors import ConfigError, RequestError
from .handles import Completion, RequestHandle
from .heads import Head
from .models import LoadedModel, load_model, unload_model
from ..memory import Arena, PagePool
from .prompts import encode_prompt, render_prompt
from .report import page_frame, workspace_stats


class Workspace:
    """One device, one arena, many heads. `background=None` runs the engine on a thread inside a Jupyter kernel
    and inline (driven by `result()` / `stream()`) elsewhere."""

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
        cpu_kernel: bool | None = None,
    ):
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        pool_bytes = parse_size(pool, what="pool")
        self.page_bytes = parse_size(page_bytes, what="page_bytes")
        if pool_bytes < self.page_bytes:
            raise ConfigError(f"pool of {format_size(pool_bytes)} is smaller than one page of {format_size(self.page_bytes)}")
        if cpu_kernel not in (None, True, False):
            raise ConfigError(f"cpu_kernel must be None (use it where it builds), True or False, got {cpu_kernel!r}")
        self.cpu_kernel = cpu_kernel  # native models' fused CPU kernel (bfloat16 on the CPU): see ModelRunner
        for name, v in (("max_batched_tokens", max_batched_tokens), ("max_seqs", max_seqs)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"{name} must be a positive integer, got {v!r}")
        self.epoch = time.perf_counter()
        self.arena = Arena(pool_bytes // self.page_bytes, self.page_bytes, self.device)
        self.pool = PagePool(self.arena.num_pages)
        self.scheduler = Scheduler(self.pool, max_batched_tokens=max_batched_tokens, max_seqs=max_seqs)
        self.recorder = Recorder()
        self.engine = Engine(self.scheduler, self.recorder, self.epoch)
        self.heads: dict[str, Head] = {}
        self.models: dict[str, LoadedModel] = {}
        from ..backends.exl2.runner import Exl2Backend  # imports no exllamav2: that happens when a head needs it

        self.backends: dict[str, object] = {"exl2": Exl2Backend()}  # region backends by name (`Head.backend`)
        self._ids = RequestIds()
        self._run_ids = RequestIds()
        self._rng = random.Random(seed)
        self._lock = threading.RLock()
        self._closed = False
        from .bus import Bus  # the bus listens to the engine's tokens

        self.bus = Bus(self.epoch)
        self.engine.listeners.append(self._publish)
        if background is None:
            background = "ipykernel" in sys.modules
        if background:
            self.engine.start_thread()

    # ---- models and heads ----------------------------------------------------------------------------------
    def add_head(self, name: str, model: str, system: str | None = None, *, replace: bool = False, **defaults) -> Head:
        """Define a head; heads naming the same model share one loaded copy of its weights."""
        self._check_open()
        head = Head.from_options(name, str(model), system, **defaults)
        with self._lock:
            if name in self.heads and not replace:
                raise ConfigError(f"a head named {name!r} already exists; remove_head({name!r}) first")
            loaded = load_model(self, str(model), head.backend, head.region)
            pin = f"\0loading {name}"  # keeps the model loaded while a head of the same name is replaced
            loaded.heads.add(pin)
            try:
                head.model = loaded.key
                quota_pages = self._quota_pages(head, loaded)  # bad quotas fail before an old head is replaced
                if name in self.heads:
                    self.remove_head(name)
                with self.engine.lock:
                    self.scheduler.add_head(
                        name, loaded.key, weight=head.weight, quota_pages=quota_pages,
                        max_concurrent=head.max_concurrent,
                    )
                    loaded.heads.add(name)
                    self.heads[name] = head
            finally:
                loaded.heads.discard(pin)
                if not loaded.heads:
                    unload_model(self, loaded)
        return head

    def remove_head(self, name: str) -> None:
        """Cancel the head's requests, free their pages; unload its model if no other head uses it."""
        with self._lock:
            head = self._head(name)
            for req in [r for r in self.scheduler.requests() if r.head == name]:
                self.engine.cancel(req)
            self._sync()
        with self._lock, self.engine.lock:
            self.engine.process_inbox()  # cancels queued after the sync
            self.scheduler.remove_head(name)
            del self.heads[name]
            loaded = self.models[head.model]
            loaded.heads.discard(name)
            if not loaded.heads:
                unload_model(self, loaded)

    def _sync(self) -> None:
        """Let the engine apply queued adds and cancels before returning."""
        if self.engine.background:
            done = threading.Event()
            self.engine.call_soon(done.set)
            if not done.wait(timeout=60):
                raise RuntimeError("the engine thread did not respond within 60 s")
        else:
            self.engine.process_inbox()

    def _quota_pages(self, head: Head, loaded: LoadedModel) -> int | None:
        """A quota in pages of the head's model's pool: for a region model (EXL2) a share of its region's own pages,
        or a size in whole own pages (each `region.page_bytes`); else of the pool's K/V pages, or `page_bytes`."""
        if head.quota is None:
            return None
        region = loaded.region
        total = self.pool.num_kv_pages if region is None else region.num_pages
        unit = self.page_bytes if region is None else region.page_bytes
        return parse_pages(head.quota, total, unit, what="quota")

    def _head(self, name: str) -> Head:
        if name not in self.heads:
            known = ", ".join(sorted(self.heads)) or "none yet"
            raise ConfigError(f"unknown head {name!r}; heads: {known}")
        return self.heads[name]

    # ---- prompts -------------------------------------------------------------------------------------------
    def tokenizer(self, head: str):
        return self.models[self._head(head).model].tokenizer

    def render_prompt(self, head: str, prompt: str | list[dict]) -> str:
        """The text the model sees: the head's system prompt and the user turn through the chat template."""
        h = self._head(head)
        return render_prompt(self.models[h.model].tokenizer, h.system, prompt)

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
        ids = self.encode_prompt(head, prompt)
        return self.submit_ids(head, ids, **overrides)

    def submit_ids(
        self, head: str, prompt_ids: list[int], *, prompt_open: bool = False, tag: dict | None = None, **overrides
    ) -> RequestHandle:
        """Queue a generation from token ids (an open prompt may grow; see `extend_prompt`)."""
        self._check_open()
        h = self._head(head)
        params = h.sampling.replace(**overrides)
        loaded = self.models[h.model]
        prompt_ids = check_token_ids(prompt_ids, getattr(loaded.spec, "vocab_size", None), f"head {head!r}'s model")
        max_ctx = loaded.spec.max_position_embeddings
        if len(prompt_ids) + 1 > max_ctx:
            raise RequestError(
                f"prompt of {len(prompt_ids)} tokens does not fit the context of {h.model!r} ({max_ctx} tokens)"
            )
        layout = self.scheduler.layouts[h.model]
        capacity = self.scheduler.capacity(head)
        need = layout.pages_for(len(prompt_ids) + 1)
        if need > capacity:
            raise RequestError(
                f"prompt of {len(prompt_ids)} tokens needs {need} pages ({layout.tokens_per_page} tokens per page) "
                f"but head {head!r} can hold at most {capacity} pages of K/V; use a larger pool or quota"
            )
        seed = params.seed if params.seed is not None else self._rng.randrange(2**63)
        gen = None if params.greedy else torch.Generator().manual_seed(seed)
        req = Request(
            id=self._ids.next(), head=head, model=h.model, prompt_ids=list(prompt_ids), params=params,
            arrival=self.engine.now(), prompt_open=prompt_open, tag=dict(tag or {}), generator=gen,
        )
        self.engine.submit(req)
        return RequestHandle(self, req)

    def extend_prompt(self, handle: RequestHandle, ids: list[int], *, close: bool = False) -> None:
        """Append token ids to an open prompt (from the engine's side); `close=True` lets it start sampling."""
        req = handle.request
        vocab = getattr(self.models[req.model].spec, "vocab_size", None)
        ids = check_token_ids(ids, vocab, f"head {req.head!r}'s model")

        def apply():
            if req.status.done:
                return
            req.prompt_ids.extend(ids)
            if close:
                req.prompt_open = False

        self.engine.call_soon(apply)

    def team(self, steps: dict):
        """A team of this workspace's heads: {head: template or Step}; see `multihead_nb.team.team`."""
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

    def generate(self, head: str, prompt: str | list[dict] | list[int], **overrides) -> Completion:
        """Generate and wait: the blocking form of `submit(...).result()`."""
        return self.submit(head, prompt, **overrides).result()

    def _completion(self, req: Request) -> Completion:
        end = req.finish_time if req.finish_time is not None else self.engine.now()
        return Completion(
            head=req.head, request_id=req.id, text=req.text, token_ids=list(req.output_ids),
            prompt_token_ids=list(req.prompt_ids), finish_reason=req.finish_reason or "",
            tokens=self.recorder.tokens({req.id}),
            ttft_s=None if req.first_token_time is None else req.first_token_time - req.arrival,
            duration_s=end - req.arrival, num_cached_tokens=req.num_cached, num_preemptions=req.num_preemptions,
        )

    def _publish(self, event: str, req: Request, payload) -> None:
        self.bus.on_engine_event(event, req, payload)

    # ---- views ---------------------------------------------------------------------------------------------
    def pages(self) -> pd.DataFrame:
        """One row per page: page, state (free, cached, kv, weights), owner, holders, model, tokens, shared.

        A page of a region model's region (EXL2) is shown by the model's own pages charged to it: `kv` and held by
        the heads holding them, `cached`, or `free` (free for that model only; its `model` column names it)."""
        with self.engine.lock:
            return self._pages()

    def _pages(self) -> pd.DataFrame:
        return page_frame(self)

    def stats(self) -> dict:
        """Pool usage, waste (allocated token slots not holding a token), queues per head, steps, tokens/s."""
        with self.engine.lock:
            return self._stats()

    def _stats(self) -> dict:
        return workspace_stats(self)

    def steps(self) -> pd.DataFrame:
        """One row per engine step and model (columns documented in `multihead_nb.engine.recorder`)."""
        return self.recorder.steps()

    def dashboard(self, **options):
        """A live dashboard (page map, scheduler queues, token streams, timeline); static figures without widgets."""
        from ..notebook.widgets.dashboard import dashboard

        return dashboard(self, **options)

    def tokens(self) -> pd.DataFrame:
        """One row per generated token (columns documented in `multihead_nb.engine.recorder`)."""
        return self.recorder.tokens()

    # ---- lifecycle -----------------------------------------------------------------------------------------
    @property
    def closed(self) -> bool:
        """Whether `close()` has run: the workspace then holds no models, heads or arena."""
        return self._closed

    def _check_open(self) -> None:
        if self._closed:
            raise ConfigError("this workspace is closed; create a new one")

    def close(self) -> None:
        """Cancel everything, stop the engine thread and drop the models and the arena."""
        if self._closed:
            return
        for req in self.scheduler.requests():
            self.engine.cancel(req)
        self._sync()
        self.engine.stop_thread()
        for loaded in list(self.models.values()):
            unload_model(self, loaded)
        self.heads.clear()
        self._closed = True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self) -> str:
        return (
            f"Workspace(device={self.device}, pool={format_size(self.arena.nbytes)}, pages={self.pool.num_pages} x "
            f"{format_size(self.page_bytes)}, heads={sorted(self.heads)})"
        )

