"""What each magic does, as plain functions on a `Workspace` (one per `%%head`, `%%team` and `%mh` subcommand).

Owns: defining heads and their one-line summary, choosing a team's variables, the text of `%mh status`, the
heads and pages frames, recreating the default workspace. Knows nothing of IPython or argument strings: those are
`parsers.py` and `magic.py`; errors raised here are the engine's own (`MultiHeadError`, `ValueError`).
"""

from __future__ import annotations

import sys

import pandas as pd

from ...config import format_size
from ...errors import TeamError


def define_head(ws, name: str, model: str, system: str | None, **options):
    """Define (or redefine) a head; returns its one-line summary. `add_head` checks everything (options, the
    checkpoint, the quota) before it replaces an old head, so a bad redefinition leaves the old head in place."""
    ws.add_head(name, model, system=system or None, replace=True, **options)
    return head_summary(ws, name)


def head_summary(ws, name: str) -> str:
    head = ws.heads[name]
    loaded = ws.models[head.model]
    layout = loaded.built.layout
    q = ws.scheduler.heads[name]
    region = getattr(loaded, "region", None)  # a region model (EXL2) counts its quota in its region's own pages
    kv_pages, unit = (ws.pool.num_kv_pages, ws.page_bytes) if region is None else (region.num_pages, region.page_bytes)
    quota = "none" if q.quota_pages is None else f"{q.quota_pages} pages ({format_size(q.quota_pages * unit)})"
    model = _short_model(getattr(loaded.spec, "name", None) or head.model)
    if layout.pages_for(1) == 0:  # served elsewhere (a remote engine): no weights, no pages here
        return f"head {name!r}: {loaded.built.note or model} · no local weights or pages"
    return (
        f"head {name!r}: {model} · {str(ws.dtype).replace('torch.', '')} · {layout.tokens_per_page} tokens/page "
        f"({format_size(ws.page_bytes)} pages) · weights {format_size(loaded.weight_pages * ws.page_bytes)} "
        f"({loaded.weight_pages} pages, shared by {len(loaded.heads)} head(s)) · quota {quota} of {kv_pages} K/V pages"
    )


def team_variables(team, given: dict, namespace: dict | None) -> dict:
    """The team's run variables: `--var` values first, then names from the notebook namespace, then the team's
    defaults (a loaded team file's `variables:`)."""
    out = {}
    for name in team.variables:
        if name in given:
            out[name] = given[name]
        elif namespace is not None and name in namespace:
            out[name] = namespace[name]
    for name in team.variables:
        if name not in out and name in team.defaults:
            out[name] = team.defaults[name]
    missing = [v for v in team.variables if v not in out]
    if missing:
        raise TeamError(
            f"missing team variable(s): {', '.join(missing)} (pass --var {missing[0]}=... or define it in the notebook)"
        )
    unknown = sorted(set(given) - set(team.variables))
    if unknown:
        raise TeamError(f"--var {unknown[0]} is not a placeholder of this team (placeholders: "
                        f"{', '.join(team.variables) or 'none'})")
    return out


def start_team(ws, steps: dict, given: dict, namespace: dict | None = None):
    """Build the team (validated before anything runs) and start it; returns the live TeamRun."""
    team = ws.team(steps)
    return team.start(**team_variables(team, given, namespace))


def save_team(ws, steps: dict, given: dict, path: str) -> str:
    """Write the team of `steps` (with its heads' definitions and `given` as variable defaults) to `path`."""
    team = ws.team(steps)
    written = team.save(path, variables=given)
    return f"saved team {team.name or written.stem!r} ({', '.join(team.steps)}) to {written}"


def load_team(ws, source: str, *, model: str | None = None, prefix: str = ""):
    """Load a team file (or a built-in team) into `ws`; returns the Team and a one-line summary."""
    from ...team.load import load_team as load

    team = load(source, ws, model=model, prefix=prefix)
    defaults = ", ".join(f"{k}={v!r}" for k, v in team.defaults.items())
    summary = (f"team {team.name!r}: heads {', '.join(team.steps)} (added to the workspace); variables "
               f"{', '.join(team.variables) or 'none'}{f' (defaults {defaults})' if defaults else ''}; "
               f"answer: {team.output_head}")
    return team, summary


def status(ws) -> str:
    """A few lines: device, pool usage, models, heads and their queues, throughput."""
    s = ws.stats()
    pool = s["pool"]
    lines = [
        f"MultiHead workspace on {s['device']} ({s['dtype']}): {pool['pages']} pages x {format_size(s['page_bytes'])} "
        f"= {format_size(pool['pages'] * s['page_bytes'])}",
        f"  pages: {pool['weights']} weights, {pool['kv']} K/V ({pool['shared']} shared), {pool['cached']} cached, "
        f"{pool['free']} free; waste {s['waste']:.0%}",
        f"  engine: {s['steps']} steps, {s['tokens_generated']} tokens, {s['tokens_per_s']:.1f} tokens/s",
    ]
    for key, m in s["models"].items():
        path = m.get("runs_on") or m["backend"]
        lines.append(f"  model {_short_model(key)}: {m['weight_pages']} weight pages, heads {', '.join(m['heads'])}; "
                     f"runs on {path}")
    for head, q in s["queues"].items():
        lines.append(
            f"  head {head}: running {q['running']}, waiting {q['waiting']}, preempted {q['preempted']}, "
            f"served {q['served_tokens']} tokens"
        )
    if not s["queues"]:
        lines.append("  no heads yet: define one with %%head NAME --model M")
    return "\n".join(lines)


def heads(ws) -> pd.DataFrame:
    """One row per head: name, model, system prompt, sampling defaults and limits."""
    rows = []
    for name, h in ws.heads.items():
        sp = h.sampling
        rows.append({
            "head": name, "model": _short_model(h.model), "system": h.system or "", "temperature": sp.temperature,
            "top_p": sp.top_p, "top_k": sp.top_k, "max_tokens": sp.max_tokens, "stop": list(sp.stop),
            "seed": sp.seed, "quota": h.quota, "weight": h.weight, "max_concurrent": h.max_concurrent,
        })
    cols = ["head", "model", "system", "temperature", "top_p", "top_k", "max_tokens", "stop", "seed", "quota",
            "weight", "max_concurrent"]
    return pd.DataFrame(rows, columns=cols)


def pages(ws) -> pd.DataFrame:
    return ws.pages()


def dashboard(ws, **options):
    return ws.dashboard(**options)


def models() -> pd.DataFrame:
    """The models loadable here without the network (`mh.list_models()`)."""
    from ...backends.native.catalog import list_models

    return list_models()


def new_workspace(**options):
    """Replace the default workspace with one built with `options` (pool, device, page_bytes, dtype); the old one
    is closed only once the new one exists, so bad options leave it (its heads, its requests) untouched."""
    from ...workspace import default

    return default.reset_workspace(**options)


def run_prompt(ws, head: str, prompt: str, out=None):
    """Generate from one head, writing the text to `out` (stdout) as it arrives; returns the Completion."""
    out = out or sys.stdout
    handle = ws.submit(head, prompt)
    for delta in handle.stream():
        out.write(delta)
        out.flush()
    out.write("\n")
    return handle.result()


def _short_model(key: str) -> str:
    parts = str(key).rstrip("/").split("/")
    return "/".join(parts[-2:]) if len(parts) > 2 else str(key)
