"""Talking to an OpenAI-compatible engine over HTTP: one streamed chat completion, its text pieces with their arrival
times, bounded retries, timeouts, cancel, and clear errors.

Owns: `RemoteConfig` (where the engine is, which of its models, the key, timeouts and retries; validated), the
request body a head's sampling options become, reading server-sent events, and turning every failure into a
`RemoteError` that names the server and the cause: it refused the key (401), has no such model (404), failed
(5xx), rejected the request (other 4xx), could not be reached after N tries, sent nothing for T seconds, or died
mid-stream. A connection error is retried (at most `retries` times, with a growing pause) only before the
response has started, so no text is ever duplicated. Knows nothing of heads, requests, pages or the engine.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from typing import Iterator
from urllib.parse import urlparse

import httpx

from ...errors import ConfigError, RequestError


class RemoteError(RequestError):
    """A remote engine refused, failed, timed out or died mid-stream."""


@dataclass(frozen=True)
class RemoteConfig:
    base_url: str  # http(s)://HOST:PORT/v1
    model: str | None  # the engine's name for the model (None: not chosen yet, e.g. to list its models)
    api_key: str | None = None
    connect_timeout: float = 5.0  # seconds to connect
    read_timeout: float = 60.0  # seconds the engine may stay silent (before the first piece, or between two)
    retries: int = 2  # extra tries on connection errors before the response starts
    backoff_s: float = 0.25  # pause before retry k: backoff_s * 2**k

    def __post_init__(self):
        url = urlparse(self.base_url)
        if url.scheme not in ("http", "https") or not url.netloc:
            raise ConfigError(f"a remote engine's URL is http(s)://HOST:PORT/v1, got {self.base_url!r}")
        object.__setattr__(self, "base_url", self.base_url.rstrip("/"))
        if self.model is not None and (not isinstance(self.model, str) or not self.model):
            raise ConfigError(f"remote_model must name the engine's model (GET {self.base_url}/models lists them), "
                              f"got {self.model!r}")
        if self.api_key is not None and (not isinstance(self.api_key, str) or not self.api_key):
            raise ConfigError("api_key must be a non-empty string or None")
        for name in ("connect_timeout", "read_timeout", "backoff_s"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
                raise ConfigError(f"{name} must be a positive number of seconds, got {v!r}")
        if isinstance(self.retries, bool) or not isinstance(self.retries, int) or not 0 <= self.retries <= 10:
            raise ConfigError(f"retries must be an integer from 0 to 10, got {self.retries!r}")

    @property
    def where(self) -> str:
        return f"the engine at {self.base_url}" if self.model is None else \
            f"remote model {self.model!r} at {self.base_url}"


def request_body(model: str, messages: list[dict], params) -> dict:
    """A chat-completions body from a `SamplingParams`; `top_k` and `ignore_eos` (vLLM's and MultiHead's extensions)
    only when they ask for something."""
    body = {"model": model, "messages": messages, "stream": True, "stream_options": {"include_usage": True},
            "temperature": params.temperature, "top_p": params.top_p, "max_tokens": params.max_tokens}
    if params.stop:
        body["stop"] = list(params.stop)
    if params.seed is not None:
        body["seed"] = params.seed
    if params.top_k:
        body["top_k"] = params.top_k
    if params.ignore_eos:
        body["ignore_eos"] = True
    return body


class ChatStream:
    """One streamed chat completion: iterate for (text piece, arrival time from `clock`); then `finish_reason`
    and `completion_tokens` (the engine's usage count, when it sends one). `cancel()` from any thread."""

    def __init__(self, config: RemoteConfig, body: dict, clock=time.perf_counter):
        self.config, self.body, self.clock = config, body, clock
        self.finish_reason: str | None = None
        self.completion_tokens: int | None = None
        self._cancelled = threading.Event()
        self._response: httpx.Response | None = None
        self._client = httpx.Client(timeout=httpx.Timeout(config.read_timeout, connect=config.connect_timeout))

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def cancel(self) -> None:
        """Stop reading (from any thread): the iteration ends without an error."""
        self._cancelled.set()
        self._close()

    def _close(self) -> None:
        response = self._response
        try:
            if response is not None:
                response.close()  # a read blocked on the socket returns
            self._client.close()
        except Exception:  # noqa: BLE001 - closing what another thread is reading may complain; it is closed
            pass

    def __iter__(self) -> Iterator[tuple[str, float]]:
        try:
            yield from self._pieces(self._open())
        finally:
            self._close()

    def _open(self) -> httpx.Response:
        c = self.config
        headers = {"Accept": "text/event-stream"}
        if c.api_key:
            headers["Authorization"] = f"Bearer {c.api_key}"
        for attempt in range(c.retries + 1):
            if self.cancelled:
                raise RemoteError(f"{c.where}: cancelled")
            try:
                request = self._client.build_request("POST", f"{c.base_url}/chat/completions", json=self.body,
                                                     headers=headers)
                response = self._client.send(request, stream=True)
            except (httpx.ConnectError, httpx.ConnectTimeout) as e:
                if attempt == c.retries or self.cancelled:
                    raise RemoteError(f"{c.where}: cannot connect after {attempt + 1} tries: {_reason(e)}") from None
                time.sleep(c.backoff_s * 2**attempt)
                continue
            except httpx.TimeoutException:
                raise RemoteError(f"{c.where}: no answer within {c.read_timeout:g} s") from None
            except httpx.HTTPError as e:
                raise RemoteError(f"{c.where}: the request failed: {_reason(e)}") from None
            self._response = response
            if response.status_code != 200:
                response.read()
                raise _status_error(c, response)
            return response
        raise AssertionError("unreachable")

    def _pieces(self, response: httpx.Response) -> Iterator[tuple[str, float]]:
        c = self.config
        done = False
        try:
            for line in response.iter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    done = True
                    break
                try:
                    event = json.loads(data)
                except json.JSONDecodeError:
                    raise RemoteError(f"{c.where}: sent an event that is not JSON: {data[:80]!r}") from None
                if isinstance(event, dict) and event.get("error"):
                    err = event["error"]
                    msg = err.get("message", err) if isinstance(err, dict) else err
                    raise RemoteError(f"{c.where}: failed mid-stream: {msg}")
                if event.get("usage"):
                    self.completion_tokens = event["usage"].get("completion_tokens")
                for choice in event.get("choices") or ():
                    text = (choice.get("delta") or {}).get("content") or ""
                    if text:
                        yield text, self.clock()
                    if choice.get("finish_reason"):
                        self.finish_reason = choice["finish_reason"]
        except httpx.TimeoutException:
            raise RemoteError(f"{c.where}: sent nothing for {c.read_timeout:g} s") from None
        except (httpx.HTTPError, OSError) as e:
            if self.cancelled:
                return
            raise RemoteError(f"{c.where}: the stream broke off mid-answer: {_reason(e)}") from None
        if self.cancelled:
            return
        if not done and self.finish_reason is None:
            raise RemoteError(f"{c.where}: the stream ended before the answer did (no finish reason, no [DONE])")


def _status_error(c: RemoteConfig, response: httpx.Response) -> RemoteError:
    try:
        err = response.json().get("error")
        detail = err.get("message") if isinstance(err, dict) else err
    except (ValueError, AttributeError):
        detail = None
    detail = detail or response.text[:200] or response.reason_phrase
    status = response.status_code
    if status == 401 or status == 403:
        what = "refused the API key" if status == 401 else "forbids this request"
        return RemoteError(f"{c.where} {what} ({status}): {detail}; give the head api_key=...")
    if status == 404:
        return RemoteError(f"{c.where}: not found ({status}): {detail}; check remote_model and the URL (.../v1)")
    if status >= 500:
        return RemoteError(f"{c.where} failed ({status}): {detail}")
    return RemoteError(f"{c.where} rejected the request ({status}): {detail}")


def _reason(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__


def list_models(config: RemoteConfig) -> list[str]:
    """The engine's model names (GET /models): checks the URL and key when a head is added."""
    headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}
    last = None
    for attempt in range(config.retries + 1):
        try:
            r = httpx.get(f"{config.base_url}/models", headers=headers,
                          timeout=httpx.Timeout(config.read_timeout, connect=config.connect_timeout))
            break
        except (httpx.ConnectError, httpx.ConnectTimeout) as e:
            last = e
            if attempt < config.retries:
                time.sleep(config.backoff_s * 2**attempt)
        except httpx.HTTPError as e:
            raise RemoteError(f"{config.where}: the request failed: {_reason(e)}") from None
    else:
        raise RemoteError(f"{config.where}: cannot connect after {config.retries + 1} tries: {_reason(last)}")
    if r.status_code != 200:
        raise _status_error(config, r)
    try:
        return [m["id"] for m in r.json()["data"]]
    except (ValueError, KeyError, TypeError):
        raise RemoteError(f"{config.where}: GET /models did not answer an OpenAI model list") from None
