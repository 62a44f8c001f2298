"""The OpenAI-compatible HTTP server of a workspace: a Starlette app served by uvicorn on a thread of its own.

Owns: the routes (`GET /v1/models`, `POST /v1/chat/completions`, `POST /v1/completions`, `GET /health`), the API
key check, which head or team a request names, turning a request into a generation (a head's system prompt unless
the messages have one; a team's input variable from the last user message), streaming it as server-sent events,
cancelling it when the client goes away, and every error as OpenAI's error JSON with its HTTP status. Every request
goes through the workspace's public API, so HTTP requests are batched by the same scheduler as the notebook's
(fairness and quotas per head hold across both). Knows nothing of tensors or pages; the request shapes are
`protocol.py`, the bridge to the engine `generations.py`, the answers `responses.py`, the thread `running.py`.

    server = ws.serve(port=8000)          # from a notebook: beside the kernel's engine thread
    server.url                            # 'http://127.0.0.1:8000/v1'
    server.stop()
"""

from __future__ import annotations

import hmac
import json
import time

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from ..errors import ConfigError, MultiHeadError, RequestError, TeamError
from . import protocol as P
from .generations import Generation, HeadGeneration, TeamGeneration
from .responses import error, respond
from .running import Server


class ServedModels:
    """What a server serves: the workspace's heads (live: heads added later are served too) and named teams."""

    def __init__(self, ws, teams=()):
        self.ws = ws
        self.teams: dict = {}
        for team in teams.values() if isinstance(teams, dict) else teams:
            self.add_team(team)

    def add_team(self, team, name: str | None = None) -> None:
        name = name or team.name
        if not name:
            raise ConfigError("a served team needs a name (team files have one; or serve(teams={'name': team}))")
        if name in self.ws.heads:
            raise ConfigError(f"team {name!r} has the name of a head; rename one of them")
        if team.ws is not self.ws:
            raise ConfigError(f"team {name!r} belongs to another workspace")
        self.teams[name] = team

    def listing(self) -> list[dict]:
        created = int(time.time())
        out = [{"id": name, "object": "model", "created": created, "owned_by": "multihead",
                "multihead": {"kind": "head", "model": h.model}} for name, h in list(self.ws.heads.items())]
        out += [{"id": name, "object": "model", "created": created, "owned_by": "multihead",
                 "multihead": {"kind": "team", "steps": list(t.steps), "answer": t.output_head,
                               "variables": t.variables}} for name, t in self.teams.items()]
        return out

    def find(self, name: str):
        if name in self.ws.heads:
            return "head", name
        if name in self.teams:
            return "team", self.teams[name]
        known = ", ".join(list(self.ws.heads) + list(self.teams)) or "none"
        raise P.APIError(404, f"The model '{name}' does not exist (models: {known})", param="model",
                         code="model_not_found")


def create_app(ws, *, teams=(), api_key: str | None = None) -> Starlette:
    """The ASGI app serving `ws`'s heads and `teams` (Team objects, or name -> Team)."""
    served = ServedModels(ws, teams)

    def check(request: Request) -> None:
        if ws.closed:
            raise P.APIError(503, "the workspace is closed", code="service_unavailable")
        if api_key is None:
            return
        auth = request.headers.get("authorization", "")
        scheme, _, given = auth.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), api_key.encode()):
            raise P.APIError(401, "Incorrect or missing API key: send 'Authorization: Bearer <key>'",
                             code="invalid_api_key")

    async def health(request: Request):
        return JSONResponse({"status": "ok" if not ws.closed else "closed"})

    async def models(request: Request):
        check(request)
        return JSONResponse({"object": "list", "data": served.listing()})

    async def model(request: Request):
        check(request)
        name = request.path_params["name"]
        served.find(name)
        return JSONResponse(next(m for m in served.listing() if m["id"] == name))

    async def chat(request: Request):
        check(request)
        req = P.parse_chat(await _json(request))
        kind, target = served.find(req.model)
        if kind == "team":
            gen = _start_team(target, req, _last_user(req.messages))
        else:
            messages = req.messages
            try:
                system = ws.head(target).system
            except MultiHeadError:  # removed since `find`
                raise P.APIError(404, f"The model '{target}' does not exist (it was removed)", param="model",
                                 code="model_not_found") from None
            if system and not any(m["role"] == "system" for m in messages):
                messages = [{"role": "system", "content": system}] + messages
            gen = _start(lambda: HeadGeneration(ws, target, _encode_chat(ws, target, messages), req.sampling))
        return await respond(request, req, gen, chat=True)

    async def completions(request: Request):
        check(request)
        req = P.parse_completion(await _json(request))
        kind, target = served.find(req.model)
        if kind == "team":
            if not isinstance(req.prompt, str):
                raise P.bad("a team's prompt is text (it fills the team's input variable)", "prompt")
            gen = _start_team(target, req, req.prompt)
        else:
            ids = req.prompt if isinstance(req.prompt, list) else _encode_text(ws, target, req.prompt)
            gen = _start(lambda: HeadGeneration(ws, target, ids, req.sampling))
        return await respond(request, req, gen, chat=False)

    async def not_found(request: Request, exc: HTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        msg = f"{request.method} {request.url.path}: {exc.detail} (this server serves /v1/models, " \
              "/v1/chat/completions and /v1/completions)"
        return error(P.APIError(exc.status_code, msg, code=code))

    async def api_error(request: Request, exc: P.APIError):
        return error(exc)

    async def server_error(request: Request, exc: Exception):
        return error(P.APIError(500, f"internal error: {type(exc).__name__}: {exc}"))

    routes = [
        Route("/health", health), Route("/v1/models", models), Route("/v1/models/{name:path}", model),
        Route("/v1/chat/completions", chat, methods=["POST"]), Route("/v1/completions", completions, methods=["POST"]),
    ]
    app = Starlette(routes=routes, exception_handlers={
        HTTPException: not_found, P.APIError: api_error, Exception: server_error})
    app.state.served = served
    return app


# ---- requests into generations ----------------------------------------------------------------------------
async def _json(request: Request):
    body = await request.body()
    try:
        return json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise P.bad(f"the request body is not valid JSON: {e}") from None


def _last_user(messages: list[dict]) -> str:
    users = [m["content"] for m in messages if m["role"] == "user"]
    if not users:
        raise P.bad("a team request needs a user message (it fills the team's input variable)", "messages")
    return users[-1]


def _encode_chat(ws, head: str, messages: list[dict]) -> list[int]:
    try:
        return ws.encode_prompt(head, messages)
    except MultiHeadError as e:
        raise _as_api_error(e) from None
    except Exception as e:  # a chat template that rejects these messages (roles out of order, ...)
        raise P.bad(f"the chat template of head {head!r} cannot render these messages: {type(e).__name__}: {e}",
                    "messages") from None


def _encode_text(ws, head: str, text: str) -> list[int]:
    ids = list(ws.tokenizer(head)(text)["input_ids"])
    if not ids:
        raise P.bad("the prompt is empty", "prompt")
    return ids


def _start_team(team, req: P.GenerationRequest, text: str) -> Generation:
    given = [k for k in req.sampling]
    if given:
        raise P.bad(f"a team's sampling options are its heads' and steps' (set them in its team file); got "
                    f"{', '.join(given)}", given[0])
    unknown = sorted(set(req.variables) - set(team.variables))
    if unknown:
        raise P.bad(f"variable {unknown[0]!r} is not a variable of team {team.name!r} (variables: "
                    f"{', '.join(team.variables) or 'none'})", "variables")
    variables = dict(req.variables)
    if team.input_variable is not None:
        variables[team.input_variable] = text
    return _start(lambda: TeamGeneration(team.ws, team, variables))


def _start(make) -> Generation:
    try:
        return make()
    except MultiHeadError as e:
        raise _as_api_error(e) from None


def _as_api_error(e: MultiHeadError) -> P.APIError:
    msg = str(e)
    if isinstance(e, RequestError) and ("context" in msg or "pages" in msg):
        return P.bad(msg, "messages", code="context_length_exceeded")
    if isinstance(e, ConfigError) and "closed" in msg:
        return P.APIError(503, msg, code="service_unavailable")
    if isinstance(e, (ConfigError, RequestError, TeamError)):
        return P.bad(msg)
    return P.APIError(500, msg)


def serve(ws, port: int = 8000, *, host: str = "127.0.0.1", teams=(), api_key: str | None = None,
          log_level: str = "warning") -> Server:
    """Serve `ws` over the OpenAI protocol on a thread (the engine must run on its own thread: in Jupyter it
    does; elsewhere create the workspace with `background=True`). `port=0` picks a free port."""
    if not ws.engine.background:
        raise ConfigError("serving needs the workspace's engine on its own thread: create it with "
                          "Workspace(background=True) (the default inside Jupyter)")
    if api_key is not None and (not isinstance(api_key, str) or not api_key):
        raise ConfigError("api_key must be a non-empty string or None")
    return Server(create_app(ws, teams=teams, api_key=api_key), host, port, log_level)
