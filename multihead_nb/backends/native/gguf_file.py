"""One GGUF file (the format of llama.cpp, Ollama and LM Studio), open and memory-mapped: its metadata and tensors.

Owns: opening a file with the `gguf` package's reader (llama.cpp's own; no parser of ours), every way a file can be
broken turned into a `CheckpointError` naming the file (not GGUF, truncated, corrupt header, unknown GGML type),
and each tensor as a `GGUFTensor`: its GGML type, its shape in torch order and its raw bytes, a read-only view of
the mapped file (so a backend that keeps weights packed can take the blocks as they are). Knows nothing of what the
metadata means for a model (`gguf_config.py`) nor of how blocks decode (`gguf_dequant.py`).

The reader is `gguf.GGUFReader` with two changes that keep its results and cut the time to open a file with a
50k-token vocabulary from ~4 s to ~0.2 s: it slices a plain ndarray view of the map (a `np.memmap` slice costs
~3 µs in `__array_finalize__`, and the reader takes ~10 slices per token string), and an array of numbers is one
part instead of one part per element (`ReaderField.contents()` of the whole field is unchanged; indexing it
element-wise is not supported).
"""

from __future__ import annotations

import hashlib
import struct
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader, GGUFValueType, LlamaFileType

from ...errors import CheckpointError

GGUF_MAGIC = b"GGUF"
_MISSING = object()


class _Reader(GGUFReader):
    """`GGUFReader`, faster on large vocabularies, with tensor types and extents checked before they are built."""

    def __init__(self, path: Path):
        self._path = path
        super().__init__(path, "r")

    @property
    def data(self) -> np.ndarray:  # the reader's own slices go through this: a plain view, no memmap subclass
        return self._plain

    @data.setter
    def data(self, value: np.ndarray) -> None:
        self._mapped = value  # keeps the map open
        self._plain = value.view(np.ndarray)

    def _get_field_parts(self, orig_offs, raw_type):
        if self.byte_order != "I" or raw_type != GGUFValueType.ARRAY:
            return super()._get_field_parts(orig_offs, raw_type)
        buf = self._plain
        itype_raw = buf[orig_offs:orig_offs + 4].view(np.uint32)  # [1]
        alen = buf[orig_offs + 4:orig_offs + 12].view(np.uint64)  # [1]
        item = GGUFValueType(int(itype_raw[0]))
        n, offs = int(alen[0]), orig_offs + 12
        parts: list[np.ndarray] = [itype_raw, alen]
        if item == GGUFValueType.STRING:  # each string is its length then its bytes, as the reader's own parts
            unpack, idxs = struct.Struct("<Q").unpack_from, []
            for _ in range(n):  # struct.error past the end of the file: corrupt lengths end the loop
                (length,) = unpack(buf, offs)
                parts += [buf[offs:offs + 8].view(np.uint64), buf[offs + 8:offs + 8 + length]]
                idxs.append(len(parts) - 1)
                offs += 8 + length
            if offs > len(buf):
                raise ValueError("a string array runs past the end of the file")
            return offs - orig_offs, parts, idxs, [GGUFValueType.ARRAY, item]
        nptype = self.gguf_scalar_to_np.get(item)
        if nptype is None:  # arrays of arrays: the reader's own way
            return super()._get_field_parts(orig_offs, raw_type)
        size = np.dtype(nptype).itemsize * n
        if offs + size > len(buf):
            raise ValueError(f"an array of {n} values runs past the end of the file")
        parts.append(buf[offs:offs + size].view(nptype))
        return 12 + size, parts, [2], [GGUFValueType.ARRAY, item]

    def _build_tensors(self, start_offs, fields):
        size = len(self._plain)
        for field in fields:
            name = bytes(field.parts[1]).decode("utf-8", "replace")
            raw_type = int(field.parts[4][0])
            try:
                ggml_type = GGMLQuantizationType(raw_type)
            except ValueError:
                raise CheckpointError(
                    f"GGUF file {self._path}: tensor {name!r} has GGML type {raw_type}, which this version of the "
                    "gguf package does not know (a newer quantization?)") from None
            elems, nbytes = GGML_QUANT_SIZES[ggml_type]
            end = start_offs + int(field.parts[5][0]) + int(np.prod(field.parts[3])) * nbytes // elems
            if end > size:
                raise CheckpointError(f"GGUF file {self._path} is truncated: tensor {name!r} needs bytes up to {end}, "
                                      f"the file has {size}")
        super()._build_tensors(start_offs, fields)


@dataclass(frozen=True)
class GGUFTensor:
    """One tensor of a GGUF file: `raw` is its bytes (uint8 `[nbytes]`, a read-only view of the mapped file)."""

    name: str  # the GGUF name, e.g. blk.0.attn_q.weight
    ggml_type: GGMLQuantizationType
    shape: tuple[int, ...]  # torch order: [rows, cols] (GGUF lists the dimensions the other way round)
    raw: np.ndarray

    @property
    def nbytes(self) -> int:
        return int(self.raw.shape[0])

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape))


class GGUFFile:
    """An open, memory-mapped GGUF file: `metadata(key)`, `tensors` by GGUF name, `architecture`, `tokenizer_key`."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise CheckpointError(f"GGUF file {self.path} does not exist")
        try:
            with open(self.path, "rb") as f:
                head = f.read(4)
        except OSError as e:
            raise CheckpointError(f"GGUF file {self.path} cannot be read ({e})") from None
        if head != GGUF_MAGIC:
            raise CheckpointError(f"{self.path} is not a GGUF file (it starts with {head!r}, not {GGUF_MAGIC!r})")
        try:
            self._reader = _Reader(self.path)
            if self._reader.byte_order != "I":
                raise CheckpointError(f"GGUF file {self.path} is big-endian, which the native runner does not read")
            self.tensors = {
                t.name: GGUFTensor(t.name, t.tensor_type, tuple(int(d) for d in reversed(t.shape.tolist())),
                                   t.data.reshape(-1).view(np.uint8))
                for t in self._reader.tensors
            }
        except CheckpointError:
            raise
        except (ValueError, IndexError, KeyError, OverflowError, TypeError, struct.error, UnicodeDecodeError,
                OSError) as e:
            raise CheckpointError(f"GGUF file {self.path} is corrupt or truncated: its header cannot be read "
                                  f"({type(e).__name__}: {e})") from None
        self.nbytes = len(self._reader.data)

    def metadata(self, key: str, default=_MISSING):
        """The value of metadata `key` (a number, string or list); `default` when absent (else CheckpointError)."""
        field = self._reader.fields.get(key)
        if field is None:
            if default is _MISSING:
                raise CheckpointError(f"GGUF file {self.path} lacks the metadata {key!r}")
            return default
        try:
            return field.contents()
        except (UnicodeDecodeError, ValueError, IndexError) as e:
            raise CheckpointError(f"GGUF file {self.path}: metadata {key!r} is corrupt ({e})") from None

    def keys(self) -> list[str]:
        return list(self._reader.fields)

    @property
    def architecture(self) -> str:
        return str(self.metadata("general.architecture"))

    @property
    def tokenizer_key(self) -> str:
        """sha256 of the bytes of the tokenizer's metadata (`tokenizer.*` and the architecture): equal keys, the
        same tokenizer, whatever the weights."""
        h = hashlib.sha256()
        buf = self._reader.data
        for name, field in self._reader.fields.items():
            if name.startswith("tokenizer.") or name == "general.architecture":
                end = field.offset + sum(int(p.nbytes) for p in field.parts)
                h.update(buf[field.offset:end].tobytes())
        return h.hexdigest()

    @property
    def quantization(self) -> str:
        """The file's quantization as llama.cpp names it (`Q4_K_M`, `Q8_0`, `F16`), else its matrices' main type."""
        ftype = self.metadata("general.file_type", None)
        try:
            return LlamaFileType(int(ftype)).name.removeprefix("MOSTLY_").removeprefix("ALL_")
        except (TypeError, ValueError):
            counts = Counter(t.ggml_type.name for t in self.tensors.values() if len(t.shape) == 2)
            return counts.most_common(1)[0][0] if counts else "unknown"

    @property
    def num_params(self) -> int:
        return sum(t.numel for t in self.tensors.values())

    def __repr__(self) -> str:
        return f"GGUFFile({str(self.path)!r}, {self.metadata('general.architecture', '?')}, {len(self.tensors)} tensors)"


def is_gguf(path: Path) -> bool:
    """Whether `path` is a file starting with the GGUF magic (Ollama's blobs have no extension)."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == GGUF_MAGIC
    except OSError:
        return False
