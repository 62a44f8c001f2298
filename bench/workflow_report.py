"""the workflow table's output: its columns, the markdown tables (workflows, sweep, start-up) and the plotly figure.

Owns the row schema (`SYSTEMS`, `COLUMNS`) and everything that turns rows into text or a figure. Knows nothing of
how the rows were measured.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path

SYSTEMS = ("sequential", "transformers_cb", "multihead", "llama_server")
MH_COLUMNS = [
    "mh_first_token_s", "mh_ttft_s", "mh_decode_tokens_per_s", "mh_peak_kv_pages", "mh_peak_pages_in_use",
    "mh_waste_mean", "mh_waste_max", "mh_step_overhead", "mh_steps", "mh_mean_batch", "mh_cached_tokens",
]
COLUMNS = [
    "system", "workflow", "rep", "wall_s", "output_tokens", "tokens_per_s", "instances", "prompt_tokens",
    "device", "model_shape", "dtype", "new_tokens", "threads", "error", *MH_COLUMNS,
]


def median(xs):
    xs = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return statistics.median(xs) if xs else math.nan


def markdown_table(df, meta: dict) -> str:
    has_vllm = bool((df.system == "vllm").any()) or bool(meta.get("vllm"))
    has_llama = bool((df.system == "llama_server").any())
    has_cb = bool((df.system == "transformers_cb").any())  # --skip-cb: no column, rather than "failed"
    peers = (("transformers_cb",) if has_cb else ()) + (("vllm",) if has_vllm else ()) \
        + (("llama_server",) if has_llama else ())
    fmt = meta.get("quantize") or meta["dtype"]
    lines = [
        f"Model: {meta['model_shape']} ({fmt}, random weights unless a checkpoint was given), "
        f"{meta['new_tokens']} new tokens per head (fixed), device {meta['device']}, {meta['threads']} threads, "
        f"median of {meta['reps']} reps.",
        "",
        "| workflow | sequential s | MultiHead s | speedup |"
        + (" transformers CB s | MultiHead vs CB |" if has_cb else "")
        + (" vllm s | MultiHead vs vllm |" if has_vllm else "")
        + (f" llama-server -np {meta['llama_server']['parallel']} s | MultiHead vs llama-server |" if has_llama else ""),
        "|---|---|---|---|" + "---|---|" * len(peers),
    ]
    for wf in meta["workflows"]:
        med = {s: median(df[(df.workflow == wf) & (df.system == s)].wall_s.tolist()) for s in (*SYSTEMS, "vllm")}
        seq, mh = med["sequential"], med["multihead"]
        line = f"| {wf} | {seq:.2f} | {mh:.2f} | {seq / mh:.2f}x |"
        for peer in peers:
            t = med[peer]
            line += " failed | - |" if math.isnan(t) else f" {t:.2f} | {t / mh:.2f}x |"
        lines.append(line)
    if has_llama:
        errs = df[(df.system == "llama_server") & (df.error.fillna("") != "")].error.unique()
        lines += ["", f"llama-server on `{Path(meta['llama_server']['gguf']).name}` ({meta['llama_server']['format']}: "
                  "the same weights), token-id prompts, fixed n_predict, ignore_eos; a step is sent when all of "
                  "its inputs have finished" + (f"; failed: {errs[0]}" if len(errs) else "")]
    errs = df[(df.system == "transformers_cb") & (df.error.fillna("") != "")].error.unique()
    if len(errs):
        lines += ["", f"transformers CB failed: {errs[0]}"]
    if meta.get("vllm"):
        v = meta["vllm"]
        lines += ["", f"vllm {v['version']} (`{v['python']}`), all reps in one process after the others"
                  + (f"; failed: {v['error']}" if v["error"] else "")]
    mh = df[df.system == "multihead"]
    if len(mh):
        lines += [
            "",
            "MultiHead's own numbers (medians over reps):",
            "",
            "| workflow | first token s | decode tok/s | output tok/s | peak K/V pages | waste mean | waste max | "
            "step overhead | mean batch |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for wf in meta["workflows"]:
            g = mh[mh.workflow == wf]
            lines.append(
                f"| {wf} | {median(g.mh_first_token_s.tolist()):.3f} | "
                f"{median(g.mh_decode_tokens_per_s.tolist()):.1f}"
                f" | {median(g.tokens_per_s.tolist()):.1f} | {int(median(g.mh_peak_kv_pages.tolist()))} | "
                f"{median(g.mh_waste_mean.tolist()):.2%} | {median(g.mh_waste_max.tolist()):.2%} | "
                f"{median(g.mh_step_overhead.tolist()):.2%} | {median(g.mh_mean_batch.tolist()):.2f} |"
            )
    return "\n".join(lines) + "\n"


def sweep_markdown(sw) -> str:
    lines = ["| heads | sequential s | MultiHead s | speedup | sequential tok/s | MultiHead tok/s |",
             "|---|---|---|---|---|---|"]
    for n in sorted(sw.heads.unique()):
        g = sw[sw.heads == n]
        s = median(g[g.system == "sequential"].wall_s.tolist())
        m = median(g[g.system == "multihead"].wall_s.tolist())
        st = median(g[g.system == "sequential"].tokens_per_s.tolist())
        mt = median(g[g.system == "multihead"].tokens_per_s.tolist())
        lines.append(f"| {n} | {s:.2f} | {m:.2f} | {s / m:.2f}x | {st:.1f} | {mt:.1f} |")
    return "\n".join(lines) + "\n"


def startup_markdown(su) -> str:
    lines = ["| system | first token after process start, s (median) | runs |", "|---|---|---|"]
    for s, g in su.groupby("system", sort=False):
        lines.append(f"| {s} | {median(g.first_token_s.tolist()):.2f} | "
                     f"{', '.join(f'{x:.2f}' for x in g.first_token_s)} |")
    return "\n".join(lines) + "\n"


def write_figure(df, sw, su, path: Path) -> bool:
    """The plotly figure as a standalone HTML file (False where plotly is not installed)."""
    try:
        import plotly.graph_objects as go
        from plotly.subplots import make_subplots
    except ImportError:
        return False

    fig = make_subplots(rows=1, cols=3, subplot_titles=("Wall seconds per workflow (median)",
                                                        "Scaling sweep: wall seconds", "Start-up to first token"))
    for s in (*SYSTEMS, "vllm"):
        g = df[df.system == s].groupby("workflow", sort=False).wall_s.median()
        if not len(g):
            continue
        fig.add_trace(go.Bar(x=list(g.index), y=list(g.values), name=s, legendgroup=s), row=1, col=1)
    if sw is not None and len(sw):
        for s in ("sequential", "multihead"):
            g = sw[sw.system == s].groupby("heads").wall_s.median()
            fig.add_trace(go.Scatter(x=list(g.index), y=list(g.values), mode="lines+markers", name=f"{s} (sweep)",
                                     legendgroup=s), row=1, col=2)
    if su is not None and len(su):
        g = su.groupby("system", sort=False).first_token_s.median()
        fig.add_trace(go.Bar(x=list(g.index), y=list(g.values), name="start-up", showlegend=False), row=1, col=3)
    fig.update_layout(template="plotly_white", height=420, barmode="group", title="MultiHead workflow table")
    fig.update_xaxes(title_text="heads", row=1, col=2)
    fig.write_html(str(path), include_plotlyjs="cdn")
    return True
