"""EXL2 heads: ExLlamaV2 models driven by our scheduler, their K/V in an `Exl2Region` of the shared arena.

Owns: recognising EXL2 checkpoints (`is_exl2_checkpoint`) and reading their shape without weights
(`read_exl2_spec`); the lazy import of the optional `exllamav2` backend with one error naming everything missing
(`require_exllamav2`); the translation of a `ForwardBatch` into `forward_chunk` calls with
`ExLlamaV2Attention.PagedParams` fields (`paged_params_fields`, pure torch on the CPU); and `Exl2Runner`, the
`ModelRunner` look-alike that loads the model with exllamav2, hands it the region's views as its cache tensors and
runs the translated calls (CUDA only).

Does not know: which pages are whose (the batch's `block_tables` hold EXL2 page ids 0..N-1 of the model's region,
handed out by whoever allocates them), heads, requests or sampling. exllamav2 is imported only inside
`require_exllamav2`, never at module import: `import exllamav2` JIT-builds a C++/CUDA extension and fails on a
CPU-only torch.

Batching follows exllamav2's dynamic generator (generator/dynamic.py, 0.3.2): all decode sequences (one new token
each) go in one call `[b, 1]`; each prefill chunk is a call of its own `[1, q]`; `block_index` is int32
`[b, max_pages]` padded with page 0 (flash-attn reads only the first ceil(seqlen / 256) entries of a row);
`cache_seqlens` int32 `[b]` counts the tokens already in the cache before the call.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import json
import struct
import types
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import CheckpointError, ConfigError
from ..memory import Arena
from .batch import ForwardBatch
from .exl2_region import EXL2_DTYPE, EXL2_PAGE_TOKENS, Exl2Region, bytes_per_exl2_page
from .loader import resolve_checkpoint

MIN_FLASH_ATTN = (2, 5, 7)  # exllamav2's paged attention calls flash_attn_with_kvcache(block_table=...)
INSTALL_HINT = "pip install 'multihead-nb[exl2]'"


# ---- recognising a checkpoint ------------------------------------------------------------------------------
def _safetensors_names(file: Path) -> list[str]:
    """Tensor names in a safetensors header ([] when the file is unreadable: this is a sniff, not a check)."""
    try:
        with open(file, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return []
            (n,) = struct.unpack("<Q", head)
            if n > 100_000_000:
                return []
            header = json.loads(f.read(n))
    except (OSError, ValueError, UnicodeDecodeError):
        return []
    return [k for k in header if k != "__metadata__"] if isinstance(header, dict) else []


def is_exl2_checkpoint(path: str | Path) -> bool:
    """Whether the local folder `path` holds an EXL2-quantized model.

    Signs (exllamav2's convert writes them): config.json `quantization_config.quant_method == "exl2"`; tensors
    named `*.q_weight` / `*.q_scale` (EXL2; GPTQ's are `qweight` / `scales`); `measurement.json` or `job_new.json`
    beside the `*.safetensors`. A missing folder is not one (no download is tried).
    """
    p = Path(path).expanduser()
    if not p.is_dir():
        return False
    cfg = p / "config.json"
    if cfg.is_file():
        try:
            qc = json.loads(cfg.read_text(encoding="utf-8")).get("quantization_config")
        except (OSError, ValueError, UnicodeDecodeError, AttributeError):
            qc = None
        if isinstance(qc, dict) and str(qc.get("quant_method", "")).lower() == "exl2":
            return True
    files = sorted(p.glob("*.safetensors"))
    for f in files:
        if any(n.endswith((".q_weight", ".q_scale")) for n in _safetensors_names(f)):
            return True
    return bool(files) and ((p / "measurement.json").is_file() or (p / "job_new.json").is_file())


@dataclass(frozen=True)
class Exl2Spec:
    """What the scheduler and the region need of an EXL2 (or FP16 Llama-family) checkpoint, from config.json."""

    name: str
    path: Path
    architecture: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_position_embeddings: int
    bits: float | None = None  # quantization_config.bits (None: not quantized)
    eos_token_ids: tuple[int, ...] = ()
    bos_token_id: int | None = None
    weight_files: tuple[Path, ...] = field(default=(), compare=False, repr=False)

    @property
    def weight_bytes(self) -> int:
        """Bytes of the weight files (quantized tensors are loaded as stored)."""
        return sum(f.stat().st_size for f in self.weight_files)

    @property
    def bytes_per_page(self) -> int:
        return bytes_per_exl2_page(self.num_layers, self.num_kv_heads, self.head_dim)


def read_exl2_spec(name_or_path: str | Path) -> Exl2Spec:
    """The shape of an EXL2 checkpoint folder (no weights loaded, no exllamav2 needed)."""
    path = resolve_checkpoint(name_or_path)
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(f"checkpoint folder {path} has no config.json")
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"config file {cfg_path} cannot be read ({e})") from None
    if not isinstance(cfg, dict):
        raise CheckpointError(f"config file {cfg_path} is not a JSON object")
    files = tuple(sorted(path.glob("*.safetensors")))
    if not files:
        raise CheckpointError(f"checkpoint folder {path} has no *.safetensors weights file")
    archs = cfg.get("architectures") or []
    if len(archs) != 1:
        raise CheckpointError(f"config file {cfg_path} must name exactly one architecture (exllamav2 needs it)")

    def ids(v) -> tuple[int, ...]:
        return () if v is None else (int(v),) if isinstance(v, int) else tuple(int(x) for x in v)

    try:
        heads = int(cfg["num_attention_heads"])
        hidden = int(cfg["hidden_size"])
        qc = cfg.get("quantization_config") if isinstance(cfg.get("quantization_config"), dict) else {}
        bos = cfg.get("bos_token_id")
        return Exl2Spec(
            name=str(name_or_path), path=path, architecture=str(archs[0]),
            num_layers=int(cfg["num_hidden_layers"]), hidden_size=hidden, num_heads=heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or hidden // heads), vocab_size=int(cfg["vocab_size"]),
            max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
            bits=float(qc["bits"]) if qc.get("bits") is not None else None,
            eos_token_ids=ids(cfg.get("eos_token_id")), bos_token_id=int(bos) if isinstance(bos, int) else None,
            weight_files=files,
        )
    except KeyError as e:
        raise CheckpointError(f"config file {cfg_path} lacks the field {e.args[0]!r}") from None
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"config file {cfg_path} has a malformed value ({e})") from None


# ---- the optional backend ----------------------------------------------------------------------------------
def _version_tuple(v: str) -> tuple[int, ...]:
    out = []
    for part in v.split("+")[0].split("."):
        digits = "".join(ch for ch in part if ch.isdigit()) if part[:1].isdigit() else ""
        if not digits:
            break
        out.append(int(digits))
    return tuple(out)


def _flash_attn_version() -> str | None:
    for dist in ("flash-attn", "flash_attn"):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def require_exllamav2() -> types.SimpleNamespace:
    """Import exllamav2 (only now), or raise one `ConfigError` naming everything that is missing.

    Returns a namespace with `ExLlamaV2`, `ExLlamaV2Config`, `ExLlamaV2Cache`, `ExLlamaV2Tokenizer`,
    `ExLlamaV2Attention`, `PagedParams` and `version`.
    """
    missing: list[str] = []
    if not (torch.version.cuda or getattr(torch.version, "hip", None)):
        missing.append(f"a CUDA build of PyTorch (this torch {torch.__version__} is a CPU-only build)")
    elif not torch.cuda.is_available():
        missing.append(f"a CUDA device (torch {torch.__version__} is built for CUDA {torch.version.cuda}, "
                       "but torch.cuda.is_available() is False)")
    if importlib.util.find_spec("exllamav2") is None:
        missing.append(f"the exllamav2 package ({INSTALL_HINT})")
    want = ".".join(map(str, MIN_FLASH_ATTN))
    if importlib.util.find_spec("flash_attn") is None:
        missing.append(f"flash-attn >= {want} (not installed; exllamav2's paged attention needs it)")
    else:
        have = _flash_attn_version()
        if have is None or _version_tuple(have) < MIN_FLASH_ATTN:
            missing.append(f"flash-attn >= {want} (found {have or 'an unknown version'}; "
                           "exllamav2's paged attention needs flash_attn_with_kvcache with block tables)")
    if missing:
        raise ConfigError("EXL2 models cannot run here; missing: " + "; ".join(missing))
    try:
        exl = importlib.import_module("exllamav2")
        attn = importlib.import_module("exllamav2.attn")
    except Exception as e:  # the JIT build of its C++/CUDA extension, a torch/CUDA mismatch, ...
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ConfigError(
            f"exllamav2 is installed but failed to import ({type(e).__name__}: {first}); it builds a C++/CUDA "
            "extension on first import, which needs the CUDA toolkit (nvcc) matching torch's CUDA version and ninja"
        ) from None
    if not getattr(attn, "has_flash_attn_with_paged", False):
        raise ConfigError(
            f"exllamav2 found no usable paged attention: flash-attn >= {want} must import with this torch and GPU "
            "(an Ampere or newer GPU; check `import flash_attn_2_cuda`), and EXLLAMA_NO_FLASH_ATTN must be unset"
        )
    try:
        get_device_stream = importlib.import_module("exllamav2.device").get_device_stream
    except (ImportError, AttributeError):
        get_device_stream = None
    return types.SimpleNamespace(
        get_device_stream=get_device_stream, ExLlamaV2=exl.ExLlamaV2, ExLlamaV2Config=exl.ExLlamaV2Config, ExLlamaV2Cache=exl.ExLlamaV2Cache,
        ExLlamaV2Tokenizer=exl.ExLlamaV2Tokenizer, ExLlamaV2Attention=attn.ExLlamaV2Attention,
        PagedParams=attn.ExLlamaV2Attention.PagedParams, version=getattr(exl, "__version__", "?"),
    )


# ---- ForwardBatch -> forward_chunk calls -------------------------------------------------------------------
def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def paged_params_fields(batch: ForwardBatch, page_size: int = EXL2_PAGE_TOKENS,
                        max_tokens_per_call: int | None = None) -> list[dict]:
    """The `forward_chunk` calls that compute `batch`, with their `PagedParams` fields (all CPU tensors).

    Decode sequences (query_len 1) share calls of up to `max_tokens_per_call` sequences; each prefill chunk is
    a call of its own, cut into pieces of at most `max_tokens_per_call` tokens. Each call is a dict:

    - `input_ids` int64 `[b, q_len]`; `batch_size` b; `q_len`; `page_size`
    - `block_index` int32 `[b, max_pages]`: row i lists the sequence's EXL2 pages covering its tokens after the
      call (ceil((cache_seqlen + q_len) / page_size) pages), padded with 0
    - `cache_seqlens` int32 `[b]`: tokens in the cache before the call; `max_cache_seqlen` their max
    - `seqs`: the batch's sequence indices in row order; `token_rows` int64 `[b * q_len]`: the flattened batch
      rows the call computes (row-major over `[b, q_len]`)
    - `preprocess_only` (no logits wanted), `last_id_only` (only the last token's); `logits_rows` int64 `[k]`:
      positions in the batch's `[L]` logits output, `logits_src` int64 `[k]`: rows of the call's logits viewed
      as `[-1, vocab]` that fill them.
    """
    if page_size < 1:
        raise ValueError(f"page_size must be positive, got {page_size}")
    cap = max_tokens_per_call or (1 << 62)
    ids = batch.input_ids.detach().to("cpu", torch.int64)  # [T]
    starts = [0]
    for q in batch.query_lens:
        starts.append(starts[-1] + q)
    want: dict[int, list[int]] = {}  # batch row -> positions in logits output
    for pos, row in enumerate(batch.logits_indices.detach().cpu().tolist()):
        if not 0 <= row < batch.num_tokens:
            raise ValueError(f"logits index {row} outside the batch's {batch.num_tokens} tokens")
        want.setdefault(int(row), []).append(pos)
    for i, (c, table) in enumerate(zip(batch.context_lens, batch.block_tables)):
        if len(table) < _ceil_div(c, page_size):
            raise ValueError(f"sequence {i}: {len(table)} pages cannot hold its {c} tokens "
                             f"({page_size} tokens per page)")

    def call(seqs: list[int], rows: list[list[int]], past: list[int]) -> dict:
        b, q = len(seqs), len(rows[0])
        after = [p + q for p in past]
        width = max(_ceil_div(a, page_size) for a in after)
        block_index = torch.zeros((b, width), dtype=torch.int32)  # [b, max_pages], padded with page 0
        for r, (s, a) in enumerate(zip(seqs, after)):
            pages = batch.block_tables[s][: _ceil_div(a, page_size)]
            block_index[r, : len(pages)] = torch.tensor(pages, dtype=torch.int32)
        flat = [t for rr in rows for t in rr]
        token_rows = torch.tensor(flat, dtype=torch.int64)  # [b * q]
        needed = [(k, t) for k, t in enumerate(flat) if t in want]
        last_only = b == 1 and q > 1 and [k for k, _ in needed] == [q - 1]
        logits_rows, logits_src = [], []
        for k, t in needed:
            for pos in want[t]:
                logits_rows.append(pos)
                logits_src.append(0 if last_only else k)
        return dict(
            input_ids=ids[token_rows].view(b, q), batch_size=b, q_len=q, page_size=page_size,
            block_index=block_index, cache_seqlens=torch.tensor(past, dtype=torch.int32),
            max_cache_seqlen=max(past), seqs=seqs, token_rows=token_rows,
            preprocess_only=not needed, last_id_only=last_only,
            logits_rows=torch.tensor(logits_rows, dtype=torch.int64),
            logits_src=torch.tensor(logits_src, dtype=torch.int64),
        )

    calls: list[dict] = []
    decode = [i for i, q in enumerate(batch.query_lens) if q == 1]
    for g in range(0, len(decode), cap):
        group = decode[g : g + cap]
        calls.append(call(group, [[starts[i]] for i in group],
                          [batch.context_lens[i] - 1 for i in group]))
    for i, q in enumerate(batch.query_lens):
        if q == 1:
            continue
        past = batch.context_lens[i] - q
        for a in range(0, q, cap):
            e = min(q, a + cap)
            calls.append(call([i], [list(range(starts[i] + a, starts[i] + e))], [past + a]))
    return calls


# ---- the runner --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Exl2Layout:
    """The scheduler's view of an EXL2 model's pages: 256-token pages of the model's region (ids 0..N-1)."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    num_pages: int  # N, pages in the region
    tokens_per_page: int = EXL2_PAGE_TOKENS
    dtype: torch.dtype = EXL2_DTYPE

    @property
    def bytes_per_page(self) -> int:
        return bytes_per_exl2_page(self.num_layers, self.num_kv_heads, self.head_dim)

    def pages_for(self, num_tokens: int) -> int:
        return _ceil_div(num_tokens, self.tokens_per_page)


class Exl2Runner:
    """Runs an EXL2 (or FP16 Llama-family) checkpoint with exllamav2 on CUDA, its K/V in `region_pages` of `arena`.

    `region_pages`: the contiguous arena pages granted to the model (`reserve_region`). `max_input_len` (tokens
    per `forward_chunk` call) sizes exllamav2's scratch buffers. Same surface as `ModelRunner`: `.layout`,
    `.device`, `.forward(batch) -> [L, vocab]` float32, where `batch.block_tables` hold EXL2 page ids 0..N-1.
    """

    def __init__(self, spec_or_path, arena: Arena, region_pages, *, device: torch.device | str | None = None,
                 max_input_len: int = 2048):
        exl = require_exllamav2()
        self.exl = exl
        self.spec = spec_or_path if isinstance(spec_or_path, Exl2Spec) else read_exl2_spec(
            getattr(spec_or_path, "path", spec_or_path))
        spec = self.spec
        self.arena = arena
        dev = torch.device(device) if device is not None else arena.device
        if dev.type != "cuda":
            raise ConfigError(f"EXL2 models run on CUDA only; the runner's device is {dev}")
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        arena_dev = arena.device if arena.device.index is not None else torch.device("cuda", torch.cuda.current_device())
        if arena.device.type != "cuda" or arena_dev != dev:
            raise ConfigError(f"the EXL2 runner's device {dev} differs from the arena's device {arena.device}")
        self.device = dev
        self.region = Exl2Region.from_pages(list(region_pages), arena.page_bytes, spec.num_layers,
                                            spec.num_kv_heads, spec.head_dim)
        self.layout = Exl2Layout(spec.num_layers, spec.num_kv_heads, spec.head_dim, self.region.num_exl2_pages)

        config = exl.ExLlamaV2Config(str(spec.path))
        config.max_input_len = max_input_len
        config.max_attention_size = max_input_len ** 2
        config.max_batch_size = 1  # scratch is sized for max_batch_size * max_input_len tokens per call
        config.arch_compat_overrides(quiet=True)
        if config.no_flash_attn:
            raise ConfigError(f"exllamav2 disabled flash-attn for {spec.path} (its architecture needs features the "
                              "installed flash-attn lacks); paged attention cannot run without it")
        got = (config.num_hidden_layers, config.num_key_value_heads, config.head_dim)
        if got != (spec.num_layers, spec.num_kv_heads, spec.head_dim):
            raise CheckpointError(f"exllamav2 reads {spec.path} as layers/kv_heads/head_dim {got}, config.json says "
                                  f"{(spec.num_layers, spec.num_kv_heads, spec.head_dim)}")
        self.config = config
        self.max_tokens_per_call = config.max_input_len * config.max_batch_size
        self.vocab_size = config.vocab_size
        model = exl.ExLlamaV2(config)
        split = None if dev.index == 0 else [0.0] * dev.index + [1.0e5]  # manual split: every layer on `dev`
        with torch.cuda.device(dev):
            model.load(gpu_split=split)
        cache_devs = {str(torch.device(d)) for d in model.cache_map.values()}
        if cache_devs != {str(dev)}:
            raise ConfigError(f"exllamav2 placed attention layers on {sorted(cache_devs)}, the arena is on {dev}")
        self.model = model
        # A lazy FP16 cache: per-layer key/value tensors left unset, then pointed at the region (no copy).
        cache = exl.ExLlamaV2Cache(model, batch_size=1, max_seq_len=self.region.max_seq_len, lazy=True)
        keys, values = self.region.layer_views(arena)  # each [1, N*256, KV, d] fp16, views of the arena
        for i in range(spec.num_layers):
            cache.key_states[i] = keys[i]
            cache.value_states[i] = values[i]
        self.cache = cache
        self.tokenizer = exl.ExLlamaV2Tokenizer(config)

    @property
    def tokens_per_page(self) -> int:
        return self.layout.tokens_per_page

    def weight_nbytes(self) -> int:
        return self.spec.weight_bytes

    def forward(self, batch: ForwardBatch) -> torch.Tensor:
        """Logits `[L, vocab]` float32 of the tokens at `batch.logits_indices`; writes the batch's K/V."""
        max_ctx = max(batch.context_lens)
        if max_ctx > self.config.max_seq_len:
            raise ConfigError(f"a sequence of {max_ctx} tokens exceeds the model's {self.config.max_seq_len} positions")
        n = self.layout.num_pages
        bad = [p for t in batch.block_tables for p in t if not 0 <= p < n]
        if bad:
            raise ValueError(f"EXL2 page ids {bad[:5]} outside the region's pages 0..{n - 1}")
        L, V = batch.logits_indices.shape[0], self.vocab_size
        out = torch.empty((L, V), dtype=torch.float32, device=self.device)  # [L, vocab]
        # exllamav2 runs on its own CUDA stream and makes it the thread's current stream (set_device_streams);
        # order it after the caller's work on the arena, and give the caller its stream back, ordered after ours.
        caller = torch.cuda.current_stream(self.device)
        theirs = self.exl.get_device_stream(self.device.index) if self.exl.get_device_stream else None
        if theirs is not None:
            theirs.wait_stream(caller)
        try:
            with torch.inference_mode(), torch.cuda.device(self.device):
                self._run_calls(batch, out)
        finally:
            now = torch.cuda.current_stream(self.device)
            if now != caller:
                caller.wait_stream(now)
                torch.cuda.set_stream(caller)
        return out

    def _run_calls(self, batch: ForwardBatch, out: torch.Tensor) -> None:
        V = self.vocab_size
        for c in paged_params_fields(batch, EXL2_PAGE_TOKENS, self.max_tokens_per_call):
            params = self.exl.PagedParams(c["batch_size"], c["block_index"], c["cache_seqlens"],
                                          c["max_cache_seqlen"], c["page_size"], c["q_len"])
            r = self.model.forward_chunk(
                input_ids=c["input_ids"],  # [b, q] int64 on the CPU: the embedding lives on the CPU
                cache=self.cache, attn_params=params,
                preprocess_only=c["preprocess_only"], last_id_only=c["last_id_only"],
            )
            self.cache.current_seq_len = 0  # forward_chunk advances it; paged calls never read it
            if c["preprocess_only"]:
                continue
            logits = r["logits"][..., :V]  # [b, q or 1, padded vocab] fp16 -> real vocab
            assert logits.shape[0] == c["batch_size"]
            flat = logits.reshape(-1, V)  # [b * q (or b), V]
            out[c["logits_rows"].to(self.device)] = flat[c["logits_src"].to(flat.device)].float().to(self.device)

    def __repr__(self) -> str:
        return (f"Exl2Runner({self.spec.name!r}, exllamav2 {self.exl.version}, device={self.device}, "
                f"pages={self.layout.num_pages} x {EXL2_PAGE_TOKENS} tokens)")
