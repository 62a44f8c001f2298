"""Pure figures: pandas frames (pages, queues, timeline, tokens, benchmark table) -> plotly Figures.

Owns: how each frame is drawn, and the head -> colour mapping every view shares. Knows nothing of workspaces,
threads or widgets: every function takes data and returns a new `go.Figure` (the live views update copies).
Traces carry `meta` dicts ({"kind": ..., "head": ...}) so tests and the browser can find them.
"""

from __future__ import annotations

import math

import pandas as pd
import plotly.graph_objects as go

PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22",
           "#7f7f7f"]
STATE_COLORS = {"weights": "#4d4d4d", "cached": "#c6dbef", "free": "#eeeeee"}
PHASE_COLORS = {"waiting": "#d9d9d9", "prefill": "#fdae6b", "decode": None}  # decode: the head's colour
ARTICLE_TABLE = pd.DataFrame({  # the MultiHead article's wall seconds per workflow
    "workflow": ["code", "research", "creative"] * 2,
    "system": ["sequential"] * 3 + ["multihead"] * 3,
    "wall_s": [14.2, 18.7, 22.5, 4.8, 6.1, 7.3],
})


def head_colors(heads) -> dict[str, str]:
    """A stable colour per head name (sorted order), shared by every figure and widget."""
    names = sorted({str(h) for h in heads if h is not None and str(h) not in ("", "weights", "nan")})
    return {h: PALETTE[i % len(PALETTE)] for i, h in enumerate(names)}


def _layout(fig: go.Figure, title: str, **kw) -> go.Figure:
    fig.update_layout(title=title, template="plotly_white", margin=dict(l=40, r=10, t=40, b=30), **kw)
    return fig


def page_map_figure(pages_df: pd.DataFrame, columns: int | None = None) -> go.Figure:
    """Every page a square in a grid, coloured by the head owning it; weights, cached and free pages in greys.

    Prefix-shared K/V pages (shared > 1) get a black outline. Hover: page, state, head, model, tokens."""
    n = len(pages_df)
    cols = columns or max(8, min(64, int(math.ceil(math.sqrt(max(n, 1) * 2)))))
    size = max(4, min(14, int(640 / cols) - 2))
    df = pages_df.assign(x=pages_df["page"] % cols, y=pages_df["page"] // cols)
    colors = head_colors(df.loc[df.state == "kv", "owner"])
    fig = go.Figure()
    groups = [("weights", df[df.state == "weights"], STATE_COLORS["weights"], {"kind": "weights"})]
    groups += [(h, df[(df.state == "kv") & (df.owner == h)], c, {"kind": "kv", "head": h}) for h, c in colors.items()]
    groups += [("cached (free, reusable)", df[df.state == "cached"], STATE_COLORS["cached"], {"kind": "cached"}),
               ("free", df[df.state == "free"], STATE_COLORS["free"], {"kind": "free"})]
    for name, g, color, meta in groups:
        shared = (g["shared"] > 1).tolist()
        hover = [
            f"page {r.page}<br>{r.state}<br>head: {r.owner or '-'}<br>model: {r.model or '-'}<br>tokens: {r.tokens}"
            + (f"<br>shared by {r.shared}" if r.shared > 1 else "")
            for r in g.itertuples()
        ]
        fig.add_trace(go.Scatter(
            x=g["x"].tolist(), y=g["y"].tolist(), mode="markers", name=f"{name} ({len(g)})", meta=meta,
            marker=dict(symbol="square", size=size, color=color,
                        line=dict(color=["#000000" if s else color for s in shared],
                                  width=[2 if s else 0 for s in shared])),
            text=hover, hoverinfo="text", showlegend=True,
        ))
    rows = max(1, int(math.ceil(n / cols)))
    fig.update_xaxes(visible=False, range=[-1, cols])
    fig.update_yaxes(visible=False, autorange="reversed")
    return _layout(fig, f"Page map: {n} pages", height=min(700, 90 + rows * (size + 2)), legend=dict(orientation="h"))


def _queues(stats_or_queues) -> dict:
    if isinstance(stats_or_queues, dict) and "queues" in stats_or_queues:
        return stats_or_queues["queues"]
    return dict(stats_or_queues or {})


def queues_figure(stats_or_queues) -> go.Figure:
    """Per head: running, waiting and preempted requests (stacked bars); `ws.stats()` or its "queues"."""
    q = _queues(stats_or_queues)
    heads = list(q)
    fig = go.Figure()
    for kind, color in (("running", "#2ca02c"), ("waiting", "#ff7f0e"), ("preempted", "#d62728")):
        fig.add_trace(go.Bar(x=heads, y=[q[h].get(kind, 0) for h in heads], name=kind, marker_color=color,
                             meta={"kind": kind}))
    served = ", ".join(f"{h}: {q[h].get('served_tokens', 0)}" for h in heads)
    return _layout(fig, f"Scheduler queues (tokens served: {served or '-'})", barmode="stack", height=260,
                   yaxis=dict(title="requests", rangemode="tozero", dtick=1))


def timeline_from_tokens(tokens_df: pd.DataFrame) -> pd.DataFrame:
    """A timeline frame (head, round, request, start, first_token, end) from a token frame alone."""
    cols = ["head", "round", "request", "start", "first_token", "end", "output_tokens"]
    if tokens_df is None or tokens_df.empty:
        return pd.DataFrame(columns=cols)
    rows = []
    for (head, req), g in tokens_df.sort_values("index").groupby(["head", "request"], sort=False):
        first = g.iloc[0]
        rows.append({"head": head, "round": int(first["round"]) if "round" in g and pd.notna(first["round"]) else 1,
                     "request": req, "start": first["t"] - first["dt"], "first_token": first["t"],
                     "end": g["t"].iloc[-1], "output_tokens": len(g)})
    return pd.DataFrame(rows, columns=cols).sort_values("start").reset_index(drop=True)


def _prefill_start(row, steps_df) -> float:
    if steps_df is None or steps_df.empty:
        return row.start
    s = steps_df[(steps_df.t_start >= row.start - 1e-9) & (steps_df.t_start <= row.first_token)]
    hit = s[[isinstance(d, dict) and d.get(row.head, 0) > 0 for d in s.tokens_by_head]]
    return float(hit.t_start.min()) if len(hit) else row.start


def timeline_figure(timeline_df: pd.DataFrame, tokens_df: pd.DataFrame | None = None,
                    steps_df: pd.DataFrame | None = None) -> go.Figure:
    """Gantt-like: one horizontal bar trace per head, a row per (head, round) with its waiting (arrival -> first
    computed step; with `steps_df`), prefill (-> first token) and decode (-> end) segments. With `tokens_df`,
    a marker per generated token (one extra "tokens" scatter trace, hidden until clicked in the legend)."""
    tl = timeline_df.dropna(subset=["start"]) if len(timeline_df) else timeline_df
    colors = head_colors(tl["head"] if len(tl) else [])
    fig = go.Figure()
    rounds = tl.groupby("head")["round"].nunique() if len(tl) else {}
    label = lambda h, r: f"{h} r{int(r)}" if rounds.get(h, 1) > 1 else str(h)  # noqa: E731
    for head in dict.fromkeys(tl["head"] if len(tl) else []):
        ys, xs, bases, cols, texts = [], [], [], [], []
        for row in tl[tl["head"] == head].itertuples():
            end = row.end if pd.notna(row.end) else (row.first_token if pd.notna(row.first_token) else row.start)
            first = row.first_token if pd.notna(row.first_token) else end
            pre = min(max(_prefill_start(row, steps_df), row.start), first)
            for phase, a, b in (("waiting", row.start, pre), ("prefill", pre, first), ("decode", first, end)):
                ys.append(label(head, row.round))
                bases.append(a)
                xs.append(max(b - a, 0.0))
                cols.append(PHASE_COLORS[phase] or colors[head])
                texts.append(f"{head} round {int(row.round)}: {phase} {max(b - a, 0):.3f} s")
        fig.add_trace(go.Bar(y=ys, x=xs, base=bases, orientation="h", name=str(head), marker_color=cols,
                             hovertext=texts, hoverinfo="text", meta={"kind": "timeline", "head": str(head)}))
    if tokens_df is not None and len(tokens_df):
        fig.add_trace(go.Scatter(
            x=tokens_df["t"], y=[label(h, r) for h, r in zip(tokens_df["head"], tokens_df.get("round", [1] * len(tokens_df)))],
            mode="markers", marker=dict(symbol="line-ns-open", size=8, color="#000000"), name="tokens",
            visible="legendonly", meta={"kind": "tokens"}, hoverinfo="x",
        ))
    fig.update_yaxes(autorange="reversed", type="category")
    return _layout(fig, "Timeline: waiting (grey), prefill (orange), decode (head colour)", barmode="overlay",
                   xaxis=dict(title="seconds since the workspace started"),
                   height=120 + 36 * max(1, len({y for t in fig.data if t.type == "bar" for y in t.y})))


def tokens_per_s_figure(tokens_df: pd.DataFrame, bin_s: float = 0.25) -> go.Figure:
    """Tokens per second over time, one line per head (tokens binned every `bin_s` seconds)."""
    fig = go.Figure()
    if tokens_df is not None and len(tokens_df):
        colors = head_colors(tokens_df["head"])
        bins = (tokens_df["t"] // bin_s) * bin_s
        counts = tokens_df.assign(bin=bins).groupby(["head", "bin"]).size().reset_index(name="n")
        for head, g in counts.groupby("head"):
            fig.add_trace(go.Scatter(x=g["bin"], y=g["n"] / bin_s, mode="lines+markers", name=str(head),
                                     line=dict(color=colors[head]), meta={"kind": "tokens_per_s", "head": str(head)}))
    return _layout(fig, "Tokens per second by head", height=280, xaxis=dict(title="seconds"),
                   yaxis=dict(title="tokens/s", rangemode="tozero"))


def workflow_table_figure(csv_df: pd.DataFrame, article: pd.DataFrame | None = ARTICLE_TABLE) -> go.Figure:
    """Grouped bars of mean wall seconds per workflow, one trace per system; with the MultiHead article's numbers."""
    df = csv_df.groupby(["system", "workflow"], as_index=False)["wall_s"].agg(["mean", "std"]).reset_index(drop=True)
    fig = go.Figure()
    for system, g in df.groupby("system", sort=False):
        fig.add_trace(go.Bar(x=g["workflow"], y=g["mean"], name=f"{system} (measured)",
                             error_y=dict(type="data", array=g["std"].fillna(0)),
                             meta={"kind": "measured", "system": system}))
    if article is not None:
        for system, g in article.groupby("system", sort=False):
            fig.add_trace(go.Bar(x=g["workflow"], y=g["wall_s"], name=f"{system} (MultiHead article)", opacity=0.45,
                                 meta={"kind": "article", "system": system}))
    return _layout(fig, "Wall seconds per workflow", barmode="group", height=360, yaxis=dict(title="seconds"))
