"""The OpenAI protocol's shapes: request bodies checked into small dataclasses, and the JSON of responses,
stream chunks, usage and errors.

Owns: which fields of `/v1/chat/completions` and `/v1/completions` are served (with the vLLM extensions `top_k`
and `ignore_eos`, and `variables` for teams), their ranges, and every error a body can cause as an `APIError`
(HTTP status + OpenAI's error JSON). A field MultiHead does not serve is an error when it asks for something
(`n: 2`, `tools: [...]`) and accepted when it holds the default (`n: 1`, `logprobs: false`); a field OpenAI does not
know is an error. Knows nothing of workspaces, heads or HTTP frameworks.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

# fields OpenAI defines that MultiHead accepts only at their "off" value (None, False, 0, 1, empty)
_OFF_VALUES = {
    "frequency_penalty": (0, 0.0), "presence_penalty": (0, 0.0), "logit_bias": ({},), "logprobs": (False,),
    "top_logprobs": (0,), "tools": ([],), "tool_choice": ("none", "auto"), "parallel_tool_calls": (True, False),
    "functions": ([],), "function_call": ("none", "auto"), "response_format": ({"type": "text"},),
    "service_level": (), "service_tier": ("auto", "default"), "store": (False,), "metadata": ({},),
    "modalities": (["text"],), "prediction": (), "audio": (), "reasoning_effort": (), "echo": (False,),
    "best_of": (1,), "suffix": ("",), "web_search_options": (), "prompt_cache_key": (), "safety_identifier": (),
    "verbosity": (), "user": None,  # `user` is any string: accepted, unused
}
_COMMON = ("model", "stream", "stream_options", "temperature", "top_p", "max_tokens", "stop", "seed", "n",
           "top_k", "ignore_eos")
CHAT_FIELDS = _COMMON + ("messages", "max_completion_tokens", "variables")
COMPLETION_FIELDS = _COMMON + ("prompt",)
SAMPLING_FIELDS = ("temperature", "top_p", "max_tokens", "stop", "seed", "top_k", "ignore_eos")
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


class APIError(Exception):
    """An error answered as OpenAI's JSON: {"error": {"message", "type", "param", "code"}} with an HTTP status."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or ("invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


@dataclass
class GenerationRequest:
    """A checked request: which model (head or team), the input, sampling overrides and streaming."""

    model: str
    messages: list[dict] | None = None  # chat
    prompt: str | list[int] | None = None  # completions
    sampling: dict = field(default_factory=dict)  # SamplingParams overrides given by the request
    stream: bool = False
    include_usage: bool = False
    variables: dict = field(default_factory=dict)  # team variables (extra body field)


def parse_chat(body) -> GenerationRequest:
    req = _common(body, CHAT_FIELDS)
    if "max_completion_tokens" in body and body["max_completion_tokens"] is not None:
        if "max_tokens" in req.sampling and req.sampling["max_tokens"] != body["max_completion_tokens"]:
            raise bad("max_tokens and max_completion_tokens disagree; give one", "max_completion_tokens")
        req.sampling["max_tokens"] = _int(body, "max_completion_tokens", 1)
    msgs = body.get("messages")
    if msgs is None:
        raise bad("'messages' is a required property", "messages")
    if not isinstance(msgs, list) or not msgs:
        raise bad("'messages' must be a non-empty array of {role, content} objects", "messages")
    req.messages = [_message(m, i) for i, m in enumerate(msgs)]
    variables = body.get("variables")
    if variables is not None:
        if not isinstance(variables, dict) or not all(isinstance(v, (str, int, float)) for v in variables.values()):
            raise bad("'variables' must be an object of name -> string (a team's variables)", "variables")
        req.variables = {str(k): str(v) for k, v in variables.items()}
    return req


def parse_completion(body) -> GenerationRequest:
    req = _common(body, COMPLETION_FIELDS)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        req.prompt = prompt
    elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        req.prompt = list(prompt)
    elif prompt is None:
        raise bad("'prompt' is a required property", "prompt")
    elif isinstance(prompt, list) and len(prompt) > 1 and all(isinstance(p, (str, list)) for p in prompt):
        raise bad("a batch of prompts is not served; send one prompt per request (requests are batched together)",
                  "prompt")
    else:
        raise bad("'prompt' must be a string or an array of token ids", "prompt")
    return req


def _common(body, fields: tuple) -> GenerationRequest:
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object")
    for key, value in body.items():
        if key in fields:
            continue
        if key not in _OFF_VALUES:
            raise bad(f"Unrecognized request argument supplied: {key}", key)
        allowed = _OFF_VALUES[key]
        if value is not None and allowed is not None and value not in allowed:
            raise bad(f"'{key}' is not supported by this server (only {allowed[0]!r} or null)" if allowed
                      else f"'{key}' is not supported by this server", key)
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad("'model' is a required property (a head or team name; GET /v1/models lists them)", "model")
    req = GenerationRequest(model=model)
    if body.get("n") not in (None, 1):
        raise bad("only n=1 is served (send several requests: they are batched together)", "n")
    stream = body.get("stream", False)
    if stream is not None and not isinstance(stream, bool):
        raise bad("'stream' must be true or false", "stream")
    req.stream = bool(stream)
    opts = body.get("stream_options")
    if opts is not None:
        if not req.stream:
            raise bad("'stream_options' is only allowed when 'stream' is true", "stream_options")
        if not isinstance(opts, dict) or set(opts) - {"include_usage", "include_obfuscation"}:
            raise bad("'stream_options' must be {\"include_usage\": true|false}", "stream_options")
        if not isinstance(opts.get("include_usage", False), bool):
            raise bad("'stream_options.include_usage' must be true or false", "stream_options")
        req.include_usage = opts.get("include_usage", False)
    s = req.sampling
    if body.get("temperature") is not None:
        s["temperature"] = _number(body, "temperature", 0.0, 2.0)
    if body.get("top_p") is not None:
        s["top_p"] = _number(body, "top_p", 0.0, 1.0)
        if s["top_p"] == 0:
            raise bad("'top_p' must be > 0", "top_p")
    if body.get("max_tokens") is not None:
        s["max_tokens"] = _int(body, "max_tokens", 1)
    if body.get("seed") is not None:
        s["seed"] = _int(body, "seed", 0)
    if body.get("top_k") is not None:
        k = body["top_k"]
        s["top_k"] = 0 if k == -1 else _int(body, "top_k", 0)  # vLLM: -1 is "off"
    if body.get("ignore_eos") is not None:
        if not isinstance(body["ignore_eos"], bool):
            raise bad("'ignore_eos' must be true or false", "ignore_eos")
        s["ignore_eos"] = body["ignore_eos"]
    stop = body.get("stop")
    if stop is not None:
        stop = [stop] if isinstance(stop, str) else stop
        if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(x, str) and x for x in stop):
            raise bad("'stop' must be a non-empty string or an array of up to 4 non-empty strings", "stop")
        if stop:
            s["stop"] = tuple(stop)
    return req


def _number(body: dict, key: str, lo: float, hi: float) -> float:
    v = body[key]
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not lo <= v <= hi:
        raise bad(f"'{key}' must be a number from {lo:g} to {hi:g}, got {v!r}", key)
    return float(v)


def _int(body: dict, key: str, lo: int) -> int:
    v = body[key]
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise bad(f"'{key}' must be an integer >= {lo}, got {v!r}", key)
    return v


def _message(m, i: int) -> dict:
    where = f"messages[{i}]"
    if not isinstance(m, dict):
        raise bad(f"{where} must be an object with 'role' and 'content'", where)
    role = m.get("role")
    if role not in ROLES:
        extra = " (tools and function calls are not served)" if role in ("tool", "function") else ""
        raise bad(f"{where}.role must be one of {', '.join(ROLES)}, got {role!r}{extra}", f"{where}.role")
    extra = sorted(k for k in m if k not in ("role", "content", "name") and m[k] not in (None, [], {}, ""))
    if extra:
        raise bad(f"{where} has fields this server does not serve: {', '.join(extra)}", where)
    content = m.get("content")
    if isinstance(content, list):  # content parts: only text
        texts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise bad(f"{where}.content[{j}] must be a text part {{\"type\": \"text\", \"text\": ...}} (only text "
                          "is served)", f"{where}.content")
            texts.append(part["text"])
        content = "".join(texts)
    if not isinstance(content, str):
        raise bad(f"{where}.content must be a string or an array of text parts, got {type(content).__name__}",
                  f"{where}.content")
    try:
        content.encode("utf-8")
    except UnicodeEncodeError:
        raise bad(f"{where}.content is not valid Unicode text (a lone surrogate)", f"{where}.content") from None
    return {"role": ROLES[role], "content": content}


# ---- responses ------------------------------------------------------------------------------------------
def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def chat_response(rid: str, model: str, text: str, finish: str, use: dict, created: int) -> dict:
    return {
        "id": rid, "object": "chat.completion", "created": created, "model": model, "system_fingerprint": None,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                     "finish_reason": finish}],
        "usage": use,
    }


def chat_chunk(rid: str, model: str, created: int, delta: dict | None, finish: str | None = None,
               use: dict | None = None, with_usage: bool = False) -> dict:
    """A stream chunk: a delta (and finish reason), or with `delta=None` the final usage chunk (no choices)."""
    out = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
           "system_fingerprint": None,
           "choices": [] if delta is None else [{"index": 0, "delta": delta, "logprobs": None,
                                                 "finish_reason": finish}]}
    if with_usage:
        out["usage"] = use
    return out


def completion_response(rid: str, model: str, text: str, finish: str | None, use: dict | None, created: int,
                        chunk: bool = False, with_usage: bool = True) -> dict:
    out = {"id": rid, "object": "text_completion", "created": created, "model": model, "system_fingerprint": None,
           "choices": [] if text is None else [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]}
    if with_usage or not chunk:
        out["usage"] = use
    return out


def finish_reason(reason: str) -> str:
    """OpenAI's finish reasons are "stop" and "length"."""
    return reason if reason in ("stop", "length") else "stop"


def now() -> int:
    return int(time.time())
