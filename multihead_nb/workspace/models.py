"""Loading models into a workspace: weights charged to the pool, one runner and tokenizer per model.

Owns: `LoadedModel`, picking a model's backend (`native`, or a region backend of `ws.backends` such as `exl2`),
the weight accounting (a model that does not fit is refused with the sizes named, and a prepacked copy is charged
too), a region backend's region (below), tokenizer loading, and unloading. Knows nothing of heads' prompts or of
requests; the workspace calls these with its own lock held and takes the engine's step lock around every shared
change.

A region model (EXL2) keeps its K/V in one contiguous run of the pool's pages, its region: `region=` of its first
head sizes it as a share of the pool's pages ("25%", 0.25) or a size ("512MiB"), `DEFAULT_REGION` when not given.
The region is cut into the model's own pages (256 tokens each for EXL2, `Exl2Region`), handed out by a
`RegionPool` that the scheduler allocates the model's requests' pages from; it goes back to the pool on unload.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ..config import format_size, parse_pages
from ..engine.engine import ModelSlot
from ..errors import ConfigError, OutOfPagesError
from ..memory.region_pool import RegionPool

if TYPE_CHECKING:
    from .workspace import Workspace


@dataclass
class LoadedModel:
    key: str
    spec: object
    runner: object
    tokenizer: object
    weight_pages: int
    heads: set = field(default_factory=set)
    backend: str = "native"
    region: RegionPool | None = None  # a region backend's own pages (None: K/V in the main pool's pages)
    quantize: str | None = None  # the format its matrices were quantized to at load (None: as stored)


DEFAULT_REGION = "25%"  # of the pool's pages, for a region model whose first head gives no region=


def model_key(model: str) -> str:
    """A local folder by its resolved path, a hub id as given."""
    p = Path(model).expanduser()
    return str(p.resolve()) if p.exists() else model


def resolve_backend(ws: "Workspace", model: str, backend: str = "auto") -> str:
    """The backend that runs `model`: "auto" picks the first of `ws.backends` that detects it, else "native"."""
    if backend == "auto":
        return next((name for name, b in ws.backends.items() if b.detects(model)), "native")
    if backend != "native" and backend not in ws.backends:
        raise ConfigError(f"unknown backend {backend!r}; known: auto, native, {', '.join(sorted(ws.backends))}")
    return backend


def region_pages(ws: "Workspace", region: str | int | float | None) -> int:
    """Arena pages of a region: a share of the pool's pages ("25%", 0.25) or a size rounded up to whole pages."""
    value = DEFAULT_REGION if region is None else region
    return parse_pages(value, ws.pool.num_pages, ws.page_bytes, what="region", round_up=True)


def load_model(ws: "Workspace", model: str, backend: str = "auto", region=None, quantize: str | None = None) -> LoadedModel:
    """Load `model` once per workspace: charge its weights to the pool, build its runner and tokenizer, register it.

    A model already loaded is shared ("auto" takes it on its backend); naming another backend, or another region
    size, is an error."""
    key = model_key(model)
    if key in ws.models:
        loaded = ws.models[key]
        name = loaded.backend if backend == "auto" else resolve_backend(ws, model, backend)
        if loaded.backend != name:
            raise ConfigError(f"{model!r} is loaded on the {loaded.backend!r} backend (heads {sorted(loaded.heads)}), "
                              f"not {name!r}; remove those heads first")
        if region is not None and (loaded.region is None or region_pages(ws, region) != len(loaded.region.arena_pages)):
            have = "no region" if loaded.region is None else f"a region of {len(loaded.region.arena_pages)} pages"
            raise ConfigError(f"{model!r} is loaded with {have}; region={region!r} asks for another (remove its heads "
                              f"{sorted(loaded.heads)} to change it)")
        if quantize is not None and quantize != loaded.quantize:
            raise ConfigError(f"{model!r} is loaded with quantize={loaded.quantize!r}; quantize={quantize!r} asks for "
                              f"another (remove its heads {sorted(loaded.heads)} to change it)")
        return loaded
    name = resolve_backend(ws, model, backend)
    if name != "native":
        return _load_region_model(ws, model, key, name, region)
    if quantize is not None and name != "native":
        raise ConfigError(f"quantize= is for natively run models; {model!r} runs on the {name!r} backend")
    if region is not None:
        raise ConfigError(f"region= is for models of a region backend ({', '.join(sorted(ws.backends))}); "
                          f"{model!r} runs natively, its K/V pages come from the whole pool")
    from ..backends.native import ModelRunner, read_spec
    from ..backends.native.tokenizer import load_tokenizer

    spec = read_spec(model)
    layout = spec.kv_layout(ws.dtype, ws.page_bytes)  # raises when a page cannot hold one token
    wbytes = spec.weight_bytes(ws.dtype)
    wpages = -(-wbytes // ws.page_bytes)
    with ws.engine.lock:
        _reserve_weights(ws, model, key, wbytes, wpages)
    try:
        runner = ModelRunner(spec, ws.arena, dtype=ws.dtype, device=ws.device, kernel=ws.cpu_kernel, quantize=quantize)
        tokenizer = load_tokenizer(spec.path)
        actual = runner.weight_nbytes()
        if -(-actual // ws.page_bytes) != wpages:  # prepacked copies, packed blocks: charge what is really held
            with ws.engine.lock:
                ws.pool.release_weights(key)
                wpages = -(-actual // ws.page_bytes)
                _reserve_weights(ws, model, key, actual, wpages)
    except BaseException:
        with ws.engine.lock:
            ws.pool.release_weights(key)
        raise
    loaded = LoadedModel(key, spec, runner, tokenizer, wpages, quantize=quantize)
    _register(ws, loaded, layout)
    return loaded


def _register(ws: "Workspace", loaded: LoadedModel, layout) -> None:
    spec, tokenizer = loaded.spec, loaded.tokenizer
    eos = set(spec.eos_token_ids or ())
    if tokenizer.eos_token_id is not None:
        eos.add(tokenizer.eos_token_id)
    slot = ModelSlot(loaded.runner, tokenizer, frozenset(eos), spec.max_position_embeddings)
    pool = None if loaded.region is None else loaded.region.pool
    with ws.engine.lock:
        ws.scheduler.add_model(loaded.key, layout, max_context=spec.max_position_embeddings, pool=pool)
        ws.engine.models[loaded.key] = slot
        ws.models[loaded.key] = loaded


def _load_region_model(ws: "Workspace", model: str, key: str, name: str, region) -> LoadedModel:
    """Load `model` on region backend `name`: weights and a contiguous region charged to the pool, then its runner."""
    from ..backends.exl2.region import Exl2Region, region_owner, release_region, reserve_region
    from ..backends.native.tokenizer import load_tokenizer

    backend = ws.backends[name]
    backend.check(ws.device)  # a clear error naming what is missing, before anything is reserved
    spec = backend.read_spec(model)
    n_region = region_pages(ws, region)
    shape = (spec.num_layers, spec.num_kv_heads, spec.head_dim)
    Exl2Region(0, n_region, ws.page_bytes, *shape)  # ConfigError: too small for one page of the model
    wbytes = spec.weight_bytes
    wpages = -(-wbytes // ws.page_bytes)
    with ws.engine.lock:
        if wpages + n_region > ws.pool.num_free:
            raise OutOfPagesError(
                f"model {model!r} needs {format_size(wbytes)} of weights plus a region of {n_region} pages "
                f"({format_size(n_region * ws.page_bytes)}) for its K/V, but only "
                f"{format_size(ws.pool.num_free * ws.page_bytes)} of the pool ({format_size(ws.arena.nbytes)}) is "
                "free; give a smaller region= or use a larger pool (Workspace(pool=...))")
        ws.pool.reserve_weights(key, wpages)
        try:
            pages = reserve_region(ws.pool, key, n_region)
        except OutOfPagesError as e:
            ws.pool.release_weights(key)
            raise OutOfPagesError(f"{e}; give a smaller region= or use a larger pool") from None
    try:
        geometry = Exl2Region.from_pages(pages, ws.page_bytes, *shape)
        runner = backend.runner(spec, ws.arena, pages, ws.device)
        if runner.layout.num_pages != geometry.num_exl2_pages:
            raise ConfigError(f"the {name} runner of {model!r} sees {runner.layout.num_pages} pages in its region, "
                              f"the region holds {geometry.num_exl2_pages}")
        tokenizer = load_tokenizer(spec.path)
    except BaseException:
        with ws.engine.lock:
            release_region(ws.pool, key, pages)
            ws.pool.release_weights(key)
        raise
    own = RegionPool(key, region_owner(key), pages, geometry.charge_map(), geometry.bytes_per_exl2_page)
    loaded = LoadedModel(key, spec, runner, tokenizer, wpages, backend=name, region=own)
    _register(ws, loaded, runner.layout)
    return loaded


def _reserve_weights(ws: "Workspace", model: str, key: str, wbytes: int, wpages: int) -> None:
    if wpages + 1 > ws.pool.num_free:
        raise OutOfPagesError(
            f"model {model!r} needs {format_size(wbytes)} of weights in {ws.dtype} plus at least one page of "
            f"K/V ({format_size(ws.page_bytes)}), but only {format_size(ws.pool.num_free * ws.page_bytes)} "
            f"of the pool ({format_size(ws.arena.nbytes)}) is free; use a larger pool (Workspace(pool=...)) "
            "or remove heads of other models"
        )
    ws.pool.reserve_weights(key, wpages)


def unload_model(ws: "Workspace", loaded: LoadedModel) -> None:
    """Forget a model no head uses: its runner, its scheduler entry, the pages charged to its weights, its region."""
    with ws.engine.lock:
        ws.scheduler.remove_model(loaded.key)
        ws.engine.models.pop(loaded.key, None)
        ws.pool.release_weights(loaded.key)
        if loaded.region is not None:
            from ..backends.exl2.region import release_region

            release_region(ws.pool, loaded.key, loaded.region.arena_pages)
        del ws.models[loaded.key]
