"""Errors a user can cause, at load and at submit: each a `MultiHeadError` that names the file, option or message at
fault, raised before anything changes (the pool's pages and the other heads as they were)."""

from __future__ import annotations

import json
import shutil
import time

import pytest

from helpers import make_ws
from multihead_nb.errors import CheckpointError, ConfigError, RequestError, TeamError

IDS = [5, 17, 42]


@pytest.fixture(scope="module")
def model(tiny_ckpt):
    return str(tiny_ckpt("llama"))


@pytest.fixture
def ws(model):
    ws = make_ws()
    ws.add_head("x", model, max_tokens=3)
    yield ws
    ws.close()


def copy_of(model, tmp_path, name="ckpt"):
    dst = tmp_path / name
    shutil.copytree(model, dst)
    return dst


def unchanged(ws, before):
    assert (ws.pool.num_free, set(ws.heads)) == before
    assert len(ws.generate("x", IDS).token_ids) == 3


def test_prompts_the_tokenizer_or_the_template_cannot_take(ws):
    with pytest.raises(RequestError, match="not valid text: surrogates not allowed at character 5"):
        ws.submit("x", "hello\ud800world")
    with pytest.raises(RequestError, match="chat message 0 .*needs a string 'content'"):
        ws.submit("x", [{"role": "user"}])
    with pytest.raises(RequestError, match="chat message 1 needs a 'role'"):
        ws.submit("x", [{"role": "user", "content": "a"}, {"content": "b"}])
    with pytest.raises(RequestError, match="non-empty list of chat messages"):
        ws.submit("x", [])
    assert len(ws.generate("x", "a fine prompt").token_ids) == 3


def test_a_broken_tokenizer_file_names_the_checkpoint(ws, model, tmp_path):
    bad = copy_of(model, tmp_path)
    (bad / "tokenizer.json").write_text('{"model": {"type": "BPE", "vocab": 7}}')
    before = (ws.pool.num_free, set(ws.heads))
    with pytest.raises(CheckpointError, match=f"cannot load the tokenizer of {bad}"):
        ws.add_head("y", str(bad))
    unchanged(ws, before)


def test_a_broken_chat_template_is_refused_at_add_head(ws, model, tmp_path):
    bad = copy_of(model, tmp_path)
    cfg = json.loads((bad / "tokenizer_config.json").read_text())
    cfg["chat_template"] = "{% for m in messages %}{{ m.content }"  # unclosed
    (bad / "tokenizer_config.json").write_text(json.dumps(cfg))
    before = (ws.pool.num_free, set(ws.heads))
    with pytest.raises(CheckpointError, match="chat template of .* does not render"):
        ws.add_head("y", str(bad))
    unchanged(ws, before)


@pytest.mark.parametrize("value", [0, -5])
def test_a_context_of_no_positions_is_refused_at_load(ws, model, tmp_path, value):
    bad = copy_of(model, tmp_path)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["max_position_embeddings"] = value
    (bad / "config.json").write_text(json.dumps(cfg))
    before = (ws.pool.num_free, set(ws.heads))
    with pytest.raises(CheckpointError, match=f"max_position_embeddings must be positive, got {value}"):
        ws.add_head("y", str(bad))
    unchanged(ws, before)


@pytest.mark.parametrize("pool,match", [(10**30, "larger than the .* of memory"), ("1e40", "size like")])
def test_an_impossible_pool_is_a_config_error(pool, match):
    with pytest.raises(ConfigError, match=match):
        make_ws(pool=pool)


def test_too_many_rounds_is_refused_at_once(ws):
    from multihead_nb.team import Step

    t = time.perf_counter()
    with pytest.raises(TeamError, match="rounds must be an integer from 1 to 100, got 20000"):
        Step("{task}", rounds=20000)
    assert time.perf_counter() - t < 0.5
