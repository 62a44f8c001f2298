"""The OpenAI-compatible server, through the official `openai` client (and httpx for raw HTTP) on a loopback port:
models, chat and text completions (streamed == non-streamed under greedy, usage == tokens generated), the head's
system prompt, teams by name, bad requests answered with OpenAI's error JSON while the server keeps serving, the API
key, client disconnects freeing pages, 32 concurrent streams batched together, LangChain, and the CLI."""

import asyncio
import threading
import time

import httpx
import openai
import pytest

import multihead_nb as mh
from helpers import make_ws
from server_process import ServerProcess

MSG = [{"role": "user", "content": "Write a haiku about pages."}]


@pytest.fixture(scope="module")
def model(tiny_ckpt):
    return str(tiny_ckpt("llama"))


@pytest.fixture(scope="module")
def served(model):
    ws = make_ws(background=True, pool="16MiB")
    ws.add_head("poet", model, system="You write poems.", max_tokens=12, ignore_eos=True)
    ws.add_head("plain", model, max_tokens=6)
    team = mh.load_team("code", ws, model=model, max_tokens=6, ignore_eos=True)
    server = ws.serve(port=0, teams=[team])
    yield ws, server, team
    server.stop()
    ws.close()


@pytest.fixture
def client(served):
    return openai.OpenAI(base_url=served[1].url, api_key="unused", max_retries=0, timeout=60)


def settled(ws, free, timeout=10.0):
    """Wait until no request is queued or running and `free` pages are free again."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        q = ws.stats()["queues"]
        if ws.pool.num_free == free and not any(v["running"] or v["waiting"] for v in q.values()):
            ws.pool.check()
            return True
        time.sleep(0.02)
    return False


def test_models_list_heads_and_teams(served, client):
    ws, server, team = served
    ids = [m.id for m in client.models.list().data]
    assert ids == ["poet", "plain", "coder", "reviewer", "documenter", "code"]
    assert client.models.retrieve("code").model_extra["multihead"]["answer"] == "reviewer"
    assert server.url.startswith("http://127.0.0.1:")


def test_chat_streamed_equals_non_streamed_and_usage_counts_tokens(served, client):
    ws = served[0]
    r = client.chat.completions.create(model="poet", messages=MSG, temperature=0)
    want = ws.generate("poet", MSG[0]["content"])  # the head's system prompt, as the server adds it
    assert r.choices[0].message.content == want.text and r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == len(want.token_ids) == 12
    assert r.usage.prompt_tokens == len(want.prompt_token_ids) and r.object == "chat.completion"
    chunks = list(client.chat.completions.create(model="poet", messages=MSG, temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert all(c.usage is None for c in chunks[:-1])
    # without include_usage: no usage chunk
    plain = list(client.chat.completions.create(model="poet", messages=MSG, temperature=0, stream=True))
    assert all(c.choices and c.usage is None for c in plain)


def test_request_options_reach_the_head(served, client):
    ws = served[0]
    own = [{"role": "system", "content": "You are terse."}] + MSG
    r = client.chat.completions.create(model="poet", messages=own, max_completion_tokens=5, seed=3, temperature=0.9,
                                       top_p=0.8)
    want = ws.generate("poet", own, max_tokens=5, seed=3, temperature=0.9, top_p=0.8)
    assert r.choices[0].message.content == want.text and r.usage.completion_tokens == 5
    assert r.usage.prompt_tokens == len(ws.encode_prompt("poet", own))  # the request's system, not the head's
    stop = want.text[2:4]
    if stop.strip():
        r = client.chat.completions.create(model="poet", messages=own, max_tokens=5, seed=3, temperature=0.9,
                                           top_p=0.8, stop=[stop])
        assert r.choices[0].message.content == want.text[: want.text.find(stop)]
        assert r.choices[0].finish_reason == "stop"


def test_text_completions(served, client):
    ws = served[0]
    ids = ws.tokenizer("poet")("Once upon a time")["input_ids"]
    want = ws.generate("poet", ids, max_tokens=7)
    r = client.completions.create(model="poet", prompt="Once upon a time", max_tokens=7, temperature=0)
    assert r.choices[0].text == want.text and r.usage.completion_tokens == 7 and r.usage.prompt_tokens == len(ids)
    streamed = list(client.completions.create(model="poet", prompt=ids, max_tokens=7, stream=True,
                                              stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in streamed if c.choices) == want.text
    assert streamed[-1].usage.total_tokens == 7 + len(ids)


def test_a_team_by_name_streams_its_answer(served, client):
    ws, _, team = served
    run = team.run(task="Sort a list")  # greedy: the same run the server does
    r = client.chat.completions.create(model="code", messages=[{"role": "user", "content": "Sort a list"}])
    assert r.choices[0].message.content == run.outputs["reviewer"] != ""
    tl = run.timeline()
    assert r.usage.completion_tokens == tl.output_tokens.sum() == 18 and r.usage.prompt_tokens == tl.prompt_tokens.sum()
    chunks = list(client.chat.completions.create(model="code", messages=[{"role": "user", "content": "Sort a list"}],
                                                 stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == run.outputs["reviewer"]
    with pytest.raises(openai.BadRequestError, match="sampling options are its heads"):
        client.chat.completions.create(model="code", messages=MSG, temperature=0.5)
    with pytest.raises(openai.BadRequestError, match="'topic' is not a variable of team 'code'"):
        client.chat.completions.create(model="code", messages=MSG, extra_body={"variables": {"topic": "x"}})


BAD = [
    ({"model": "nope", "messages": MSG}, 404, "model_not_found", "does not exist"),
    ({"model": "poet", "messages": MSG, "temperature": 3}, 400, None, "'temperature' must be a number from 0 to 2"),
    ({"model": "poet", "messages": MSG, "temperature": "hot"}, 400, None, "temperature"),
    ({"model": "poet"}, 400, None, "'messages' is a required property"),
    ({"model": "poet", "messages": []}, 400, None, "non-empty array"),
    ({"model": "poet", "messages": [{"role": "user"}]}, 400, None, "content must be a string"),
    ({"model": "poet", "messages": [{"role": "wizard", "content": "x"}]}, 400, None, "role must be one of"),
    ({"model": "poet", "messages": [{"role": "user", "content": "word " * 600}]}, 400, "context_length_exceeded",
     "context"),
    ({"model": "poet", "messages": MSG, "n": 2}, 400, None, "only n=1"),
    ({"model": "poet", "messages": MSG, "tools": [{"type": "function"}]}, 400, None, "'tools' is not supported"),
    ({"model": "poet", "messages": MSG, "colour": "red"}, 400, None, "Unrecognized request argument supplied: colour"),
    ({"model": "poet", "messages": MSG, "max_tokens": 0}, 400, None, "'max_tokens' must be an integer >= 1"),
    ({"model": "poet", "messages": MSG, "stop": 5}, 400, None, "'stop' must be"),
    ({"model": "poet", "messages": MSG, "stream_options": {"include_usage": True}}, 400, None, "only allowed when"),
    ({"messages": MSG}, 400, None, "'model' is a required property"),
]


@pytest.mark.parametrize("body, status, code, words", BAD)
def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(served, client, body, status, code, words):
    ws = served[0]
    free = ws.pool.num_free
    r = httpx.post(served[1].url + "/chat/completions", json=body, timeout=30)
    assert r.status_code == status
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and words in err["message"], err
    assert err["type"] == "invalid_request_error" and err["code"] == code
    assert settled(ws, free)
    assert client.chat.completions.create(model="plain", messages=MSG).choices[0].message.content is not None


def test_a_request_that_fails_mid_generation(served, model):
    ws, server, _ = served
    tpp = ws.scheduler.layouts[ws.heads["poet"].model].tokens_per_page
    prompt = len(ws.encode_prompt("poet", MSG[0]["content"]))
    pages = -(-(prompt + 4) // tpp)  # room for the prompt and a few tokens, not for 400
    ws.add_head("cramped", model, system="You write poems.", quota=f"{pages * ws.page_bytes}B", ignore_eos=True)
    free = ws.pool.num_free
    client = openai.OpenAI(base_url=server.url, api_key="x", max_retries=0)
    with pytest.raises(openai.APIError, match="quota") as e:
        for _ in client.chat.completions.create(model="cramped", messages=MSG, max_tokens=400, stream=True):
            pass  # the error arrives as an event after some text
    assert "cramped" in str(e.value)
    with pytest.raises(openai.InternalServerError, match="quota"):
        client.chat.completions.create(model="cramped", messages=MSG, max_tokens=400)
    assert settled(ws, free)
    ws.remove_head("cramped")
    assert client.chat.completions.create(model="plain", messages=MSG).choices[0].message.content is not None


def test_raw_http_errors(served):
    url = served[1].url
    r = httpx.post(url + "/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    r = httpx.get(url + "/nothing-here")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    r = httpx.get(url + "/chat/completions")
    assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed"
    r = httpx.post(url + "/completions", json={"model": "poet", "prompt": [1, 2, 10**6]})
    assert r.status_code == 400 and "vocabulary" in r.json()["error"]["message"]
    r = httpx.post(url + "/completions", json={"model": "poet", "prompt": ["a", "b"]})
    assert r.status_code == 400 and "batch of prompts" in r.json()["error"]["message"]
    assert httpx.get(url.removesuffix("/v1") + "/health").json() == {"status": "ok"}


def test_api_key(model):
    ws = make_ws(background=True)
    ws.add_head("solo", model, max_tokens=3)
    server = ws.serve(port=0, api_key="s3cret")
    try:
        for key in ("wrong", "s3cret-and-more"):
            c = openai.OpenAI(base_url=server.url, api_key=key, max_retries=0)
            with pytest.raises(openai.AuthenticationError, match="API key"):
                c.models.list()
            with pytest.raises(openai.AuthenticationError):
                c.chat.completions.create(model="solo", messages=MSG)
        for headers in ({}, {"Authorization": "Basic s3cret"}, {"Authorization": "Bearer"}):
            r = httpx.get(server.url + "/models", headers=headers)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(server.url.removesuffix("/v1") + "/health").status_code == 200  # no key needed
        ok = openai.OpenAI(base_url=server.url, api_key="s3cret", max_retries=0)
        assert [m.id for m in ok.models.list().data] == ["solo"]
        assert ok.chat.completions.create(model="solo", messages=MSG).usage.completion_tokens >= 1
    finally:
        server.stop()
        ws.close()


def test_a_client_that_disconnects_frees_its_pages(served, tiny_ckpt):
    ws, server, _ = served
    ws.add_head("long", str(tiny_ckpt("llama", max_position_embeddings=8192)), ignore_eos=True)
    free = ws.pool.num_free
    body = {"model": "long", "messages": MSG, "max_tokens": 4000, "stream": True}
    with httpx.stream("POST", server.url + "/chat/completions", json=body, timeout=30) as r:
        lines = r.iter_lines()
        got = [next(lines) for _ in range(6)]
        assert any(line.startswith("data: ") for line in got)
        assert ws.pool.num_free < free  # its pages are held while it streams
    assert settled(ws, free), "the disconnected stream's request still holds pages"
    # a non-streamed request whose client gives up
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/chat/completions", json={**body, "stream": False}, timeout=0.6)
    assert settled(ws, free), "the abandoned request still holds pages"
    written = ws.tokens().query("head == 'long'").groupby("request").size()
    assert len(written) == 2 and written.max() < 4000  # both were cut short, not run to the end
    ws.remove_head("long")
    free = ws.pool.num_free
    # a team run whose client goes away: every step is cancelled
    with httpx.stream("POST", server.url + "/chat/completions", timeout=30,
                      json={"model": "code", "messages": MSG, "stream": True}) as r:
        next(r.iter_lines())
    assert settled(ws, free)


def test_an_abandoned_request_is_cancelled_while_its_text_flows():
    """A non-streamed request watches its client every DISCONNECT_POLL_S even while text keeps arriving (a model
    that streams a delta more often than that never left the wait idle, and a request its client had given up on
    ran to its end): the client gone, the generation is cancelled and the answer is the 499 error."""
    from multihead_nb.server import protocol as P
    from multihead_nb.server.responses import DISCONNECT_POLL_S, respond

    class Flowing:  # a generation whose text never stops: a delta every 10 ms
        outcome = None
        cancelled = False

        async def deltas(self):
            while not self.cancelled:
                await asyncio.sleep(0.01)
                yield "x"

        def cancel(self):
            self.cancelled = True

    class Client:  # a request whose client goes away after 0.3 s
        def __init__(self):
            self.t0 = time.monotonic()

        async def is_disconnected(self):
            return time.monotonic() - self.t0 > 0.3

    gen = Flowing()
    req = P.GenerationRequest(model="m", prompt="hi")

    async def main():
        return await asyncio.wait_for(respond(Client(), req, gen, chat=False), timeout=0.3 + 4 * DISCONNECT_POLL_S)

    out = asyncio.run(main())
    assert out.status_code == 499 and b"client_closed" in out.body
    assert gen.cancelled


def test_32_concurrent_streams_from_4_threads(served):
    ws, server, _ = served
    free = ws.pool.num_free
    prompts = [f"Tell me about the number {i}." for i in range(8)]
    solo = {p: ws.generate("poet", p, max_tokens=10).text for p in prompts}
    steps_before = ws.engine.step_count
    results, errors = {}, []

    async def thread_main(t):
        client = openai.AsyncOpenAI(base_url=server.url, api_key="x", max_retries=0, timeout=120)

        async def one(i):
            prompt = prompts[i % len(prompts)]
            stream = await client.chat.completions.create(
                model="poet", messages=[{"role": "user", "content": prompt}], max_tokens=10, stream=True,
                stream_options={"include_usage": True})
            text, use = "", None
            async for c in stream:
                if c.choices:
                    text += c.choices[0].delta.content or ""
                if c.usage:
                    use = c.usage
            results[(t, i)] = (prompt, text, use.completion_tokens)

        await asyncio.gather(*(one(i) for i in range(8)))
        await client.close()

    def run(t):
        try:
            asyncio.run(thread_main(t))
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=run, args=(t,)) for t in range(4)]
    with ws.engine.lock:  # no step runs until all 32 HTTP requests and the notebook's one have arrived
        for th in threads:
            th.start()
        deadline = time.monotonic() + 120
        while sum(r.head == "poet" for r in ws.engine.live_requests()) < 32 and not errors:
            assert time.monotonic() < deadline, "the 32 HTTP requests did not all reach the engine"
            time.sleep(0.01)
        notebook = ws.submit("plain", "From the notebook.", max_tokens=30, ignore_eos=True)
    for th in threads:
        th.join(timeout=300)
    assert not errors, errors
    assert len(notebook.result().token_ids) == 30
    assert len(results) == 32
    for prompt, text, n in results.values():
        assert n == 10 and text == solo[prompt]
    steps = ws.steps()
    steps = steps[steps.step >= steps_before]
    assert steps.num_seqs.max() >= 8  # batched together by the one scheduler
    assert steps.tokens_by_head.apply(lambda d: "poet" in d and "plain" in d).any()  # with the notebook's too
    assert settled(ws, free)


def test_langchain_chat_openai(served):
    from langchain_openai import ChatOpenAI

    ws, server, _ = served
    llm = ChatOpenAI(base_url=server.url, api_key="x", model="poet", temperature=0, max_retries=0)
    want = ws.generate("poet", MSG[0]["content"]).text
    assert llm.invoke(MSG[0]["content"]).content == want
    assert "".join(chunk.content for chunk in llm.stream(MSG[0]["content"])) == want


def test_serve_needs_the_engine_thread(model):
    ws = make_ws()
    with pytest.raises(mh.ConfigError, match="background=True"):
        ws.serve(port=0)
    ws.close()


def test_cli_serve(model, tmp_path, capsys):
    server = ServerProcess("--model", f"tiny={model}", "--team", "research", "--team-model", model,
                           "--max-tokens", "4", "--api-key", "k")
    try:
        assert server.url.startswith("http://127.0.0.1:")
        assert server.banner == "MultiHead: heads tiny, researcher, summarizer, critic; teams research; API key required"
        c = openai.OpenAI(base_url=server.url, api_key="k", max_retries=0)
        assert [m.id for m in c.models.list().data][-1] == "research"
        assert 1 <= c.chat.completions.create(model="tiny", messages=MSG).usage.completion_tokens <= 4
    finally:
        assert server.stop() == 0  # Ctrl-C ends it cleanly
    from multihead_nb.server.cli import head_name, main

    assert main(["--model", str(tmp_path / "missing"), "--port", "0"]) == 2
    assert capsys.readouterr().err.startswith(f"error: checkpoint folder {tmp_path / 'missing'} does not exist")
    assert head_name("HuggingFaceTB/SmolLM2-135M-Instruct") == "smollm2_135m_instruct"
    assert head_name("/m/SmolLM2-135M-Instruct.Q4_1.gguf") == "smollm2_135m_instruct_q4_1"
    assert head_name("ollama:qwen2.5:0.5b") == "qwen2_5_0_5b"
