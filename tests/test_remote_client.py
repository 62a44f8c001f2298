"""The remote-engine client against a second MultiHead server process on loopback: streamed pieces equal the
engine's own answer; a wrong key (401), an unknown model (404), a rejected request (400), a refused connection
(retried, bounded), a silent engine (paused: timeout), an engine that dies mid-stream, and cancel. 5xx answers and
a stream cut short without [DONE] come from a tiny raw HTTP server in this file."""

import http.server
import socket
import threading
import time

import openai
import pytest

from multihead_nb.backends.remote.client import ChatStream, RemoteConfig, RemoteError, list_models, request_body
from multihead_nb.engine.sampling import SamplingParams
from multihead_nb.errors import ConfigError
from server_process import ServerProcess

MSG = [{"role": "system", "content": "You plan."}, {"role": "user", "content": "Plan a picnic."}]


@pytest.fixture(scope="module")
def remote(tiny_ckpt):
    server = ServerProcess("--model", f"planner={tiny_ckpt('llama')}", "--api-key", "k")
    yield server
    server.stop()


def config(remote, **kw):
    kw.setdefault("api_key", "k")
    return RemoteConfig(remote.url, kw.pop("model", "planner"), **kw)


def test_pieces_equal_the_engines_answer(remote):
    params = SamplingParams(max_tokens=9, ignore_eos=True)
    want = openai.OpenAI(base_url=remote.url, api_key="k").chat.completions.create(
        model="planner", messages=MSG, max_tokens=9, temperature=0, extra_body={"ignore_eos": True})
    stream = ChatStream(config(remote), request_body("planner", MSG, params))
    pieces = list(stream)
    assert "".join(p for p, _ in pieces) == want.choices[0].message.content
    times = [t for _, t in pieces]
    assert times == sorted(times) and len(pieces) >= 2
    assert stream.finish_reason == "length" and stream.completion_tokens == 9
    assert list_models(config(remote)) == ["planner"]


def test_errors_name_the_server_and_cause(remote):
    body = request_body("planner", MSG, SamplingParams(max_tokens=3))
    with pytest.raises(RemoteError, match=r"refused the API key \(401\)"):
        list(ChatStream(config(remote, api_key="wrong"), body))
    with pytest.raises(RemoteError, match=r"refused the API key \(401\)"):
        list_models(config(remote, api_key=None))
    with pytest.raises(RemoteError, match=r"remote model 'nope' at http://127.0.0.1:\d+/v1: not found \(404\)"):
        list(ChatStream(config(remote, model="nope"), {**body, "model": "nope"}))
    with pytest.raises(RemoteError, match=r"rejected the request \(400\): 'messages' must be a non-empty"):
        list(ChatStream(config(remote), {**body, "messages": []}))


def test_a_refused_connection_is_retried_then_fails(remote):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    c = RemoteConfig(f"http://127.0.0.1:{port}/v1", "planner", retries=2, backoff_s=0.1)
    t0 = time.monotonic()
    with pytest.raises(RemoteError, match="cannot connect after 3 tries"):
        list(ChatStream(c, request_body("planner", MSG, SamplingParams())))
    assert time.monotonic() - t0 >= 0.1 + 0.2  # two pauses, growing


def test_config_is_validated():
    for kw, words in (({"base_url": "ftp://x"}, "http"), ({"model": ""}, "remote_model"),
                      ({"read_timeout": 0}, "read_timeout"), ({"retries": 11}, "retries")):
        args = {"base_url": "http://127.0.0.1:1/v1", "model": "m", **kw}
        with pytest.raises(ConfigError, match=words):
            RemoteConfig(**args)


class _Faulty(http.server.BaseHTTPRequestHandler):
    """503 on /fail, a stream that stops without [DONE] on /cut."""

    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        if self.path.startswith("/fail"):
            body = b'{"error": {"message": "overloaded", "type": "server_error"}}'
            self.send_response(503)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        self.wfile.write(b'data: {"choices": [{"index": 0, "delta": {"content": "half"}}]}\n\n')
        self.wfile.flush()

    def log_message(self, *args):
        pass


def test_5xx_and_a_stream_cut_short():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Faulty)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{httpd.server_address[1]}"
        body = request_body("m", MSG, SamplingParams())
        with pytest.raises(RemoteError, match=r"failed \(503\): overloaded"):
            list(ChatStream(RemoteConfig(base + "/fail/v1", "m"), body))
        got = []
        with pytest.raises(RemoteError, match="ended before the answer did"):
            for piece, _ in ChatStream(RemoteConfig(base + "/cut/v1", "m"), body):
                got.append(piece)
        assert got == ["half"]
    finally:
        httpd.shutdown()


def test_cancel_ends_the_stream(remote):
    stream = ChatStream(config(remote), request_body("planner", MSG, SamplingParams(max_tokens=400,
                                                                                   ignore_eos=True)))
    got = []
    for piece, _ in stream:
        got.append(piece)
        if len(got) == 3:
            threading.Thread(target=stream.cancel).start()
    assert 3 <= len(got) < 400 and stream.cancelled


def test_a_silent_engine_times_out(remote):
    stream = ChatStream(config(remote, read_timeout=0.5),
                        request_body("planner", MSG, SamplingParams(max_tokens=400, ignore_eos=True)))
    it = iter(stream)
    next(it)
    remote.pause()
    try:
        with pytest.raises(RemoteError, match="sent nothing for 0.5 s"):
            for _ in it:
                pass
    finally:
        remote.resume()


def test_an_engine_that_dies_mid_stream(remote):
    """Last in this file: it kills the module's server process."""
    stream = ChatStream(config(remote), request_body("planner", MSG, SamplingParams(max_tokens=400,
                                                                                   ignore_eos=True)))
    it = iter(stream)
    next(it)
    remote.kill()
    with pytest.raises(RemoteError, match="broke off mid-answer|ended before the answer did"):
        for _ in it:
            pass
