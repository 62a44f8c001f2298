"""The models loaded in a workspace: which backend runs each, what each holds of the pool, and their registration.

Owns: `LoadedModel` and `ModelTable` — picking a model's backend among the registered ones (`backend="auto"`: the
first that detects the reference), charging the pool before anything is loaded (weights, and a region of
contiguous pages for backends that ask for one; a model that does not fit is refused with the sizes named),
building it through the backend, charging what it really holds, registering it with the scheduler and the engine,
sharing one copy per key between heads (a head's quota in pages of its model's pool), and giving everything back
on unload (or when a load fails half-way).

Knows no backend by name: they are `Backend`s (`backends/base.py`). Knows nothing of heads' prompts or requests.
Every change to the pool, scheduler or engine is made under the engine's step lock.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from ..backends.base import Backend, BuiltModel, LoadTarget, ModelPlan
from ..config import ceil_div, format_size, parse_pages
from ..engine.engine import Engine, ModelSlot
from ..engine.scheduler import Scheduler
from ..errors import ConfigError, OutOfPagesError
from ..memory import PagePool
from ..memory.region_pool import region_owner
from .prompts import check_chat_template


@dataclass
class LoadedModel:
    key: str
    backend: str
    built: BuiltModel
    weight_pages: int
    region_pages: list[int] = field(default_factory=list)  # arena pages of its region (region backends)
    heads: set[str] = field(default_factory=set)

    @property
    def spec(self):
        return self.built.spec

    @property
    def runner(self):
        return self.built.runner

    @property
    def tokenizer(self):
        return self.built.tokenizer

    @property
    def region(self):
        return self.built.region


class ModelTable(Mapping):
    """The loaded models of one workspace, by key."""

    def __init__(self, pool: PagePool, scheduler: Scheduler, engine: Engine, target: LoadTarget,
                 backends: dict[str, Backend]):
        self.pool, self.scheduler, self.engine, self.target = pool, scheduler, engine, target
        self.backends = backends
        self._models: dict[str, LoadedModel] = {}

    def __getitem__(self, key: str) -> LoadedModel:
        return self._models[key]

    def __iter__(self):
        return iter(self._models)

    def __len__(self) -> int:
        return len(self._models)

    # ---- choosing a backend --------------------------------------------------------------------------------
    def backend_for(self, model: str, backend: str = "auto") -> str:
        """The name of the backend that runs `model`: the one named, or for "auto" the first that detects it."""
        if backend == "auto":
            for name, b in self.backends.items():
                if b.detects(model):
                    return name
            raise ConfigError(f"no backend runs {model!r}; backends: {', '.join(self.backends)}")
        if backend not in self.backends:
            raise ConfigError(f"unknown backend {backend!r}; known: auto, {', '.join(self.backends)}")
        return backend

    def plan(self, model: str, backend: str = "auto", options: dict | None = None) -> tuple[str, ModelPlan]:
        """(backend name, plan) for `model`, read from its files; loads nothing (the magics validate with this)."""
        name = self.backend_for(model, backend)
        return name, self.backends[name].plan(model, self.target, dict(options or {}))

    # ---- loading -------------------------------------------------------------------------------------------
    def load(self, model: str, backend: str = "auto", options: dict | None = None) -> LoadedModel:
        """Load `model` once: a model already loaded is shared ("auto" takes it on the backend it runs on; another
        backend, or another region size, is an error)."""
        for loaded in self._models.values():
            if self.backends[loaded.backend].key(model, options or {}) == loaded.key:
                return self._shared(loaded, model, backend, options or {})
        name, plan = self.plan(model, backend, options)
        page_bytes = self.pool_page_bytes
        weight_pages = ceil_div(plan.weight_bytes, page_bytes)
        with self.engine.lock:
            self._check_fits(model, plan, weight_pages)
            self.pool.reserve_weights(plan.key, weight_pages)
            try:
                region = self.pool.reserve_run(plan.region_pages, region_owner(plan.key), plan.key) \
                    if plan.region_pages else []
            except OutOfPagesError as e:
                self.pool.release_weights(plan.key)
                raise OutOfPagesError(f"{e}; give a smaller region= or use a larger pool") from None
        try:
            built = self.backends[name].build(plan, self.target, region or None)
            check_chat_template(built.tokenizer, f"{model!r}")
            held = ceil_div(built.weight_bytes, page_bytes)
            if held > weight_pages:  # e.g. prepacked copies: charge what is really held
                with self.engine.lock:
                    self.pool.release_weights(plan.key)
                    if held - weight_pages > self.pool.num_free:
                        self.pool.reserve_weights(plan.key, weight_pages)
                        raise OutOfPagesError(f"model {model!r} holds {format_size(built.weight_bytes)} of weights "
                                              "once loaded, more than the pool has free; use a larger pool")
                    self.pool.reserve_weights(plan.key, held)
                    weight_pages = held
        except BaseException:
            with self.engine.lock:
                self.pool.release_weights(plan.key)
                if region:
                    self.pool.release(region, region_owner(plan.key))
            raise
        loaded = LoadedModel(plan.key, name, built, weight_pages, region)
        slot = ModelSlot(built.runner, built.tokenizer, built.eos_ids, built.spec.max_position_embeddings)
        with self.engine.lock:
            self.scheduler.add_model(plan.key, built.layout, max_context=built.spec.max_position_embeddings,
                                     pool=None if built.region is None else built.region.pool)
            self.engine.models[plan.key] = slot
            self._models[plan.key] = loaded
        return loaded

    @property
    def pool_page_bytes(self) -> int:
        return self.target.page_bytes

    def _shared(self, loaded: LoadedModel, model: str, backend: str, options: dict) -> LoadedModel:
        name = loaded.backend if backend == "auto" else self.backend_for(model, backend)
        if loaded.backend != name:
            raise ConfigError(f"{model!r} is loaded on the {loaded.backend!r} backend (heads {sorted(loaded.heads)}), "
                              f"not {name!r}; remove those heads first")
        if any(v is not None for v in options.values()):  # options given again must be what it was loaded with
            _, plan = self.plan(model, name, options)
            if plan.region_pages != len(loaded.region_pages):
                raise ConfigError(f"{model!r} is loaded with a region of {len(loaded.region_pages)} pages; the "
                                  f"options {options} ask for {plan.region_pages} (remove its heads "
                                  f"{sorted(loaded.heads)} to change it)")
        return loaded

    def _check_fits(self, model: str, plan: ModelPlan, weight_pages: int) -> None:
        free = self.pool.num_free
        need_kv = plan.region_pages or 1
        if weight_pages + need_kv <= free:
            return
        pb = self.pool_page_bytes
        kv = (f"a region of {plan.region_pages} pages ({format_size(plan.region_pages * pb)}) for its K/V"
              if plan.region_pages else f"at least one page of K/V ({format_size(pb)})")
        hint = "give a smaller region= or use a larger pool" if plan.region_pages else \
            "use a larger pool (Workspace(pool=...)) or remove heads of other models"
        raise OutOfPagesError(
            f"model {model!r} needs {format_size(plan.weight_bytes)} of weights in {self.target.dtype} plus {kv}, "
            f"but only {format_size(free * pb)} of the pool ({format_size(self.pool.num_pages * pb)}) is free; {hint}")

    def quota_pages(self, quota, loaded: LoadedModel) -> int | None:
        """A head's quota in pages of its model's pool: for a region model a share of its region's own pages, or a
        size in whole own pages (each `region.page_bytes`); else of the pool's K/V pages, or its page size."""
        if quota is None:
            return None
        region = loaded.region
        total = self.pool.num_kv_pages if region is None else region.num_pages
        unit = self.pool_page_bytes if region is None else region.page_bytes
        return parse_pages(quota, total, unit, what="quota")

    def release(self, loaded: LoadedModel, holder: str) -> None:
        """`holder` (a head) no longer uses `loaded`; unload it if no one else does."""
        loaded.heads.discard(holder)
        if not loaded.heads:
            self.unload(loaded)

    def unload(self, loaded: LoadedModel) -> None:
        """Forget a model no head uses: its runner, its scheduler entry, its weight pages, its region."""
        with self.engine.lock:
            self.scheduler.remove_model(loaded.key)
            self.engine.models.pop(loaded.key, None)
            self.pool.release_weights(loaded.key)
            if loaded.region_pages:
                self.pool.release(loaded.region_pages, region_owner(loaded.key))
            del self._models[loaded.key]
        self.backends[loaded.backend].release(loaded.built)
