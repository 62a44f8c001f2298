"""The remote backend: a head whose tokens come from an OpenAI-compatible engine over HTTP (vLLM, SGLang,
llama-server, Ollama, another MultiHead), `model="openai:http://HOST:PORT/v1"` with `remote_model="NAME"`.

Owns: recognising such references, their per-head options (`remote_model`, `api_key`, `timeout`, `retries`), the
check made when a head is added (the engine answers `GET /models`, knows the key and serves `remote_model`; with one
model served, `remote_model` may be left out), and building the model: no weights and no pages, a `RemoteCodec` as
its tokenizer, a `RemoteRunner` as its runner. Knows nothing of the pool, heads or requests.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

from ...errors import ConfigError
from ..base import BuiltModel, LoadTarget, ModelPlan, check_options
from .client import RemoteConfig, RemoteError, list_models
from .codec import RemoteCodec
from .runner import RemoteRunner

PREFIX = "openai:"
API_KEY_ENV = "MULTIHEAD_REMOTE_API_KEY"  # the key when a head gives none (never written to team files)
MAX_CONTEXT = 1 << 31  # the remote engine checks its own context; prompts here are counted in characters


@dataclass
class RemoteSpec:
    name: str
    config: RemoteConfig
    max_position_embeddings: int = MAX_CONTEXT
    vocab_size: None = None  # ids are characters and the pieces the engine sent: no fixed vocabulary
    eos_token_ids: tuple = ()


class RemoteBackend:
    name = "remote"
    options: tuple[str, ...] = ("remote_model", "api_key", "timeout", "retries")

    def detects(self, model: str) -> bool:
        return isinstance(model, str) and model.startswith(PREFIX)

    def key(self, model: str, options: dict | None = None) -> str:
        """`openai:URL#REMOTE_MODEL?timeout=T&retries=R&key=FP` with the parts that are given: heads asking for
        other connection options get a connection of their own. FP is a fingerprint of an explicit API key (never
        the key). A key is also a reference: `plan` reads the remote model, timeout and retries back from it."""
        if not self.detects(model):
            return model
        url, options = self._options(model, options or {})
        key = f"{PREFIX}{url}" + (f"#{options['remote_model']}" if options.get("remote_model") else "")
        extra = [f"{k}={options[k]:g}" if k == "timeout" else f"{k}={options[k]}"
                 for k in ("timeout", "retries") if options.get(k) is not None]
        if options.get("api_key"):
            extra.append("key=" + hashlib.sha256(str(options["api_key"]).encode()).hexdigest()[:8])
        return key + (f"?{'&'.join(extra)}" if extra else "")

    @staticmethod
    def _options(model: str, options: dict) -> tuple[str, dict]:
        """The URL of `openai:URL[#NAME][?timeout=T&retries=R&key=FP]` and the options, the reference's filling
        those not given (an API key always comes from the options or the environment)."""
        ref = model[len(PREFIX):]
        ref, _, query = ref.partition("?")
        url, _, name = ref.partition("#")
        merged = {k: v for k, v in options.items() if v is not None}
        if name and "remote_model" not in merged:
            merged["remote_model"] = name
        for part in filter(None, query.split("&")):
            k, _, v = part.partition("=")
            if k in ("timeout", "retries") and k not in merged:
                try:
                    merged[k] = float(v) if k == "timeout" else int(v)
                except ValueError:
                    raise ConfigError(f"{model!r}: {k} must be a number, got {v!r}") from None
            elif k not in ("timeout", "retries", "key"):
                raise ConfigError(f"{model!r}: unknown part {k!r} (a remote model is "
                                  f"{PREFIX}http://HOST:PORT/v1[#NAME][?timeout=T&retries=R])")
        return url, merged

    def plan(self, model: str, target: LoadTarget, options: dict) -> ModelPlan:
        check_options(self, model, options)
        if not self.detects(model):
            raise ConfigError(f"the remote backend runs models named {PREFIX}http://HOST:PORT/v1, got {model!r}")
        url, given = self._options(model, options)
        kw = {"api_key": given.get("api_key") or os.environ.get(API_KEY_ENV) or None}
        if "timeout" in given:
            t = given["timeout"]
            if isinstance(t, bool) or not isinstance(t, (int, float)) or not t > 0:
                raise ConfigError(f"timeout must be a positive number of seconds, got {t!r}")
            kw.update(read_timeout=float(t), connect_timeout=min(float(t), 10.0))
        if "retries" in given:
            kw["retries"] = given["retries"]
        probe = RemoteConfig(url, None, **kw)
        try:
            served = list_models(probe)
        except RemoteError as e:
            raise ConfigError(f"cannot add a head on {PREFIX}{url}: {e}") from None  # names the engine and cause
        name = given.get("remote_model")
        if name is None:
            if len(served) != 1:
                raise ConfigError(f"{url} serves {len(served)} models ({', '.join(served) or 'none'}): give "
                                  "remote_model=NAME")
            name = served[0]
        elif name not in served:
            raise ConfigError(f"{url} does not serve remote_model {name!r} (it serves: {', '.join(served) or 'none'})")
        config = RemoteConfig(url, name, **kw)
        return ModelPlan(self.key(model, options), 0, detail=RemoteSpec(f"{name} at {url}", config))

    def build(self, plan: ModelPlan, target: LoadTarget, region: list[int] | None) -> BuiltModel:
        assert region is None, "a remote model holds no pages"
        spec: RemoteSpec = plan.detail
        codec = RemoteCodec(plan.key)
        runner = RemoteRunner(spec.config, codec)
        return BuiltModel(spec, runner, codec, runner.layout, frozenset(), 0,
                          note=f"remote: {spec.config.model!r} at {spec.config.base_url}")

    def release(self, built: BuiltModel) -> None:
        built.runner.close()
