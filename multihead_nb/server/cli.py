"""`python -m multihead_nb serve`: a workspace with heads and teams, served over the OpenAI protocol until Ctrl-C.

    python -m multihead_nb serve [--host 127.0.0.1] [--port 8000] [--model [NAME=]MODEL ...] [--team FILE ...]
                                 [--team-model MODEL] [--api-key KEY] [--pool 1GiB] [--device auto] [--dtype auto]

Owns: the command's arguments, building the workspace (engine on its own thread), its heads (`--model`, one head
per model, named NAME or after the model) and teams (`--team`, a team file or a built-in team name), and the line
saying where it serves (`serving on http://HOST:PORT/v1`, flushed: scripts wait for it). With neither `--model`
nor `--team` it serves the default model. `--api-key` (or the MULTIHEAD_API_KEY environment variable) makes every
request need `Authorization: Bearer KEY`. Knows nothing of the routes (`app.py`).
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import sys
import threading

API_KEY_ENV = "MULTIHEAD_API_KEY"


def head_name(model: str) -> str:
    """A head name (a Python identifier) from a model reference: 'org/SmolLM2-135M-Instruct' -> 'smollm2_135m_instruct'."""
    ref = re.sub(r"^[A-Za-z]+:(?!//)", "", model.rstrip("/\\"))  # ollama:NAME:TAG -> NAME:TAG
    stem = re.split(r"[/\\]", ref)[-1]
    stem = re.sub(r"\.(gguf|safetensors)$", "", stem, flags=re.I)
    name = re.sub(r"[^0-9a-zA-Z]+", "_", stem).strip("_").lower() or "model"
    return name if name[0].isalpha() else f"m_{name}"


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m multihead_nb serve",
                                description="Serve MultiHead heads and teams over the OpenAI protocol.")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    p.add_argument("--port", type=int, default=8000, help="port (0: any free port; the line printed says which)")
    p.add_argument("--model", action="append", default=[], metavar="[NAME=]MODEL",
                   help="serve a head on MODEL (hub id, folder or file), named NAME or after the model; repeatable")
    p.add_argument("--team", action="append", default=[], metavar="FILE",
                   help="serve a team file (or a built-in team: code, research, creative); repeatable")
    p.add_argument("--team-model", metavar="MODEL", help="run every head of the --team files on this model")
    p.add_argument("--system", help="system prompt of the --model heads")
    p.add_argument("--max-tokens", type=int, help="default max_tokens of the --model heads")
    p.add_argument("--api-key", help=f"require 'Authorization: Bearer KEY' (default: ${API_KEY_ENV} if set)")
    p.add_argument("--pool", default="1GiB")
    p.add_argument("--page-bytes", default="256KiB")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--log-level", default="warning", choices=["critical", "error", "warning", "info", "debug"])
    args = p.parse_args(argv)
    if not 0 <= args.port <= 65535:
        p.error(f"--port must be from 0 to 65535, got {args.port}")
    return args


def build(args, default_model: str | None = None):
    """The workspace and its served teams, from the arguments; MultiHeadError when a model or file is bad."""
    from ..errors import ConfigError
    from ..team.load import load_team
    from ..workspace.workspace import Workspace

    models = list(args.model)
    if not models and not args.team:
        if default_model is None:
            raise ConfigError("nothing to serve: give --model MODEL or --team FILE")
        models = [default_model]
    ws = Workspace(device=args.device, pool=args.pool, page_bytes=args.page_bytes, dtype=args.dtype,
                      background=True)
    try:
        options = {} if args.max_tokens is None else {"max_tokens": args.max_tokens}
        for ref in models:
            name, sep, model = ref.partition("=")
            if not sep or not name.isidentifier():
                name, model = head_name(ref), ref
            ws.add_head(name, model, system=args.system, **options)
        teams = [load_team(f, ws, model=args.team_model) for f in args.team]
    except BaseException:
        ws.close()
        raise
    return ws, teams


def main(argv: list[str] | None = None, default_model: str | None = None) -> int:
    """The command; `default_model` is served when neither --model nor --team is given."""
    from ..errors import MultiHeadError
    from .app import serve

    args = parse_args(sys.argv[1:] if argv is None else argv)
    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    try:
        ws, teams = build(args, default_model)
    except MultiHeadError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        server = serve(ws, port=args.port, host=args.host, teams=teams, api_key=api_key, log_level=args.log_level)
    except MultiHeadError as e:
        ws.close()
        print(f"error: {e}", file=sys.stderr)
        return 2
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    heads, names = ", ".join(ws.heads), ", ".join(t.name for t in teams)
    print(f"MultiHead: heads {heads}" + (f"; teams {names}" if names else "")
          + ("; API key required" if api_key else ""), flush=True)
    print(f"serving on {server.url}", flush=True)
    try:
        while not stop.wait(0.5) and server.running:
            pass
    finally:
        server.stop()
        ws.close()
    return 0
