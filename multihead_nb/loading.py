"""Loading models into a workspace: weights charged to the pool, one runner and tokenizer per model.

Owns: `LoadedModel`, the weight accounting (a model that does not fit is refused with the sizes named, and a
prepacked copy is charged too), tokenizer loading, and unloading. Knows nothing of heads' prompts or of requests;
the workspace calls these with its own lock held and takes the engine's step lock around every shared change.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from .config import format_size
from .engine.engine import ModelSlot
from .errors import CheckpointError, OutOfPagesError

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


def load_tokenizer(path: Path):
    """The checkpoint's tokenizer. A `tokenizer.json` is loaded as it is (fast: no `AutoTokenizer` machinery, which
    imports every model family's config, ~1.5 s); other checkpoints go through `AutoTokenizer`."""
    if (Path(path) / "tokenizer.json").is_file():
        from transformers import PreTrainedTokenizerFast

        return PreTrainedTokenizerFast.from_pretrained(str(path))
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def model_key(model: str) -> str:
    """A local folder by its resolved path, a hub id as given."""
    p = Path(model).expanduser()
    return str(p.resolve()) if p.exists() else model

def load_model(ws: "Workspace", model: str) -> LoadedModel:
    """Load `model` once per workspace: charge its weights to the pool, build its runner and tokenizer, register it."""
    key = model_key(model)
    if key in ws.models:
        return ws.models[key]
    from .models import ModelRunner, read_spec
    from .models.exl2_checkpoint import is_exl2_checkpoint, require_exllamav2

    if is_exl2_checkpoint(model):
        require_exllamav2()  # a clear error naming what is missing (CUDA torch, exllamav2, flash-attn)
        raise CheckpointError(
            f"{model!r} is an EXL2 checkpoint; the ExLlamaV2 runner and its arena region exist "
            "(multihead_nb.models.exl2_runner, exl2_region), but driving it from the scheduler has not landed yet"
        )
    spec = read_spec(model)
    layout = spec.kv_layout(ws.dtype, ws.page_bytes)  # raises when a page cannot hold one token
    wbytes = spec.weight_bytes(ws.dtype)
    wpages = -(-wbytes // ws.page_bytes)
    with ws.engine.lock:
        _reserve_weights(ws, model, key, wbytes, wpages)
    try:
        runner = ModelRunner(spec, ws.arena, dtype=ws.dtype, device=ws.device)
        tokenizer = load_tokenizer(spec.path)
        actual = runner.weight_nbytes()
        if -(-actual // ws.page_bytes) > wpages:  # prepacked copies: charge what is really held
            with ws.engine.lock:
                ws.pool.release_weights(key)
                wpages = -(-actual // ws.page_bytes)
                _reserve_weights(ws, model, key, actual, wpages)
    except BaseException:
        with ws.engine.lock:
            ws.pool.release_weights(key)
        raise
    eos = set(spec.eos_token_ids or ())
    if tokenizer.eos_token_id is not None:
        eos.add(tokenizer.eos_token_id)
    slot = ModelSlot(runner, tokenizer, frozenset(eos), spec.max_position_embeddings)
    loaded = LoadedModel(key, spec, runner, tokenizer, wpages)
    with ws.engine.lock:
        ws.scheduler.add_model(key, layout, max_context=spec.max_position_embeddings)
        ws.engine.models[key] = slot
        ws.models[key] = loaded
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
    """Forget a model no head uses: its runner, its scheduler entry and the pages charged to its weights."""
    with ws.engine.lock:
        ws.scheduler.remove_model(loaded.key)
        ws.engine.models.pop(loaded.key, None)
        ws.pool.release_weights(loaded.key)
        del ws.models[loaded.key]
