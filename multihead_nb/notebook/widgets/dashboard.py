"""Live views: the workspace dashboard (page map, scheduler queues, token streams, timeline) and `TeamView`, the
per-head token streams `%%team` shows while a run goes.

Owns: the refresh threads (~10 Hz, one `batch_update` per figure per frame, daemon threads that never block the
kernel), the bus subscription that collects token text, `.stop()`, and the fallback to static plotly figures where
widgets cannot render (no kernel: plain Python, a terminal). Knows nothing of how figures are drawn (`figures.py`)
or how the engine works: it reads `ws.pages()`, `ws.stats()`, `ws.tokens()` and bus messages.
"""

from __future__ import annotations

import html
import os
import threading
import time

import ipywidgets as W
import plotly.graph_objects as go

from . import figures as F
from .page_map import PageMap

_MAX_CHARS = 4000  # of one head's stream kept on screen


def widgets_available() -> bool:
    """True inside a Jupyter kernel (a frontend may render widgets); `MULTIHEAD_STATIC=1` forces static figures."""
    if os.environ.get("MULTIHEAD_STATIC", "") not in ("", "0"):
        return False
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    ip = get_ipython()
    return ip is not None and getattr(ip, "kernel", None) is not None


def static_figures(ws) -> dict[str, go.Figure]:
    tokens = ws.tokens()
    return {
        "page_map": F.page_map_figure(ws.pages()),
        "queues": F.queues_figure(ws.stats()),
        "timeline": F.timeline_figure(F.timeline_from_tokens(tokens), tokens, ws.steps()),
        "tokens_per_s": F.tokens_per_s_figure(tokens),
    }


class StaticDashboard:
    """The dashboard without widgets: `.figures` (plotly Figures, made once); shown once when displayed."""

    live = False

    def __init__(self, ws):
        self.ws = ws
        self.figures = static_figures(ws)

    def stop(self) -> None:
        pass

    def _ipython_display_(self):
        from IPython.display import display

        if widgets_available():
            for fig in self.figures.values():
                display(fig)
        else:
            print(repr(self))

    def __repr__(self) -> str:
        return f"StaticDashboard({self.ws!r}; figures: {', '.join(self.figures)})"


def sync_figure(fw: go.FigureWidget, fig: go.Figure) -> None:
    """Make `fw` show `fig`: one batch_update when the traces keep their kinds, else the traces are replaced."""
    same = [(t.type, t.name) for t in fw.data] == [(t.type, t.name) for t in fig.data]
    if not same:
        with fw.batch_update():
            fw.data = []
            fw.add_traces(list(fig.data))
            fw.layout = fig.layout
        return
    with fw.batch_update():
        for old, new in zip(fw.data, fig.data):
            props = new.to_plotly_json()
            props.pop("type", None)
            old.update(props, overwrite=True)
        fw.layout.update(fig.layout.to_plotly_json(), overwrite=True)


def _stream_html(head: str, text: str, color: str, note: str = "") -> str:
    return (f'<div class="mh-stream" data-head="{html.escape(head)}" data-chars="{len(text)}" '
            f'style="border-left:4px solid {color};padding-left:6px;margin:2px 0">'
            f'<b>{html.escape(head)}</b> <small>{html.escape(note)}</small>'
            f'<pre style="white-space:pre-wrap;max-height:12em;overflow:auto;margin:2px 0">'
            f"{html.escape(text[-_MAX_CHARS:])}</pre></div>")


class _Refresher:
    """A daemon thread calling `self.update()` every `interval` seconds until `stop()`."""

    def _start(self, interval: float) -> None:
        self.interval = interval
        self.frames = self.ticks = 0
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"mh-{type(self).__name__}", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.ticks += 1
            try:
                if self.update():
                    self.frames += 1
            except Exception as e:  # a view never kills the kernel; keep the last error for inspection
                self.errors.append(f"{type(e).__name__}: {e}")
            if self._finished():
                break

    def _finished(self) -> bool:
        return False

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def stop(self) -> None:
        """Stop refreshing (after one last full update)."""
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        self._last = None
        try:
            self.update()
        except Exception as e:
            self.errors.append(f"{type(e).__name__}: {e}")

    def _repr_mimebundle_(self, **kwargs):
        return self.widget._repr_mimebundle_(**kwargs)


class Dashboard(_Refresher):
    """Live page map, scheduler queues, token streams per head and timeline of one workspace."""

    live = True

    def __init__(self, ws, interval: float = 0.1, timeline_every: float = 0.5):
        if interval <= 0:
            raise ValueError(f"interval must be positive, got {interval}")
        self.ws = ws
        self.timeline_every = timeline_every
        self.page_map = PageMap(ws)
        self.queues = go.FigureWidget(F.queues_figure(ws.stats()))
        tokens = ws.tokens()
        self.timeline = go.FigureWidget(F.timeline_figure(F.timeline_from_tokens(tokens), tokens))
        self.status = W.HTML()
        self.stream_box = W.VBox()
        self.streams: dict[str, W.HTML] = {}
        self._texts: dict[str, list] = {}  # head -> [request id, text, finish reason]
        self._lock = threading.Lock()
        self._last = None
        self._last_timeline = 0.0
        self._sub = ws.bus.subscribe("*", callback=self._on_message)
        self.widget = W.VBox([self.status, W.HBox([self.page_map, self.queues], layout=W.Layout(flex_flow="row wrap")), self.stream_box, self.timeline])
        self.widget.add_class("mh-dashboard")
        self.update()
        self._start(interval)

    def _on_message(self, msg) -> None:  # the engine thread: keep it cheap
        if msg.kind not in ("tokens", "end"):
            return
        with self._lock:
            cur = self._texts.get(msg.topic)
            if cur is None or cur[0] != msg.request:
                cur = self._texts[msg.topic] = [msg.request, "", None]
            if msg.kind == "tokens":
                cur[1] = (cur[1] + msg.text)[-_MAX_CHARS:]
            else:
                cur[2] = msg.finish_reason or "end"

    def update(self) -> bool:
        ws = self.ws
        with self._lock:
            texts = {h: tuple(v) for h, v in self._texts.items()}
        key = (ws.engine.step_count, ws.pool.num_free, len(ws.heads), texts)
        if key == self._last:
            return False
        self._last = key
        self.page_map.refresh()
        stats = ws.stats()
        sync_figure(self.queues, F.queues_figure(stats))
        self._update_streams(texts)
        now = time.monotonic()
        if now - self._last_timeline >= self.timeline_every or self._stop.is_set():
            self._last_timeline = now
            tokens = ws.tokens()
            sync_figure(self.timeline, F.timeline_figure(F.timeline_from_tokens(tokens), tokens))
        pool = stats["pool"]
        self.status.value = (f'<span class="mh-status" data-steps="{stats["steps"]}">{stats["steps"]} steps · '
                             f'{stats["tokens_generated"]} tokens · {stats["tokens_per_s"]:.1f} tokens/s · pages: '
                             f'{pool["kv"]} K/V, {pool["weights"]} weights, {pool["free"]} free</span>')
        return True

    def _update_streams(self, texts: dict) -> None:
        colors = F.head_colors(ws_heads := list(self.ws.heads))
        for head in ws_heads:
            if head not in self.streams:
                self.streams[head] = W.HTML()
                self.stream_box.children = tuple(self.streams.values())
            req, text, end = texts.get(head, (None, "", None))
            note = "" if req is None else f"request {req}" + (f" · {end}" if end else " · streaming")
            value = _stream_html(head, text, colors.get(head, "#999"), note)
            if self.streams[head].value != value:
                self.streams[head].value = value

    def _finished(self) -> bool:
        return self.ws.closed

    def stop(self) -> None:
        super().stop()
        self._sub.close()


class TeamView(_Refresher):
    """One box per step head showing its output as it streams; `finish()` after the run ends."""

    def __init__(self, run, interval: float = 0.1):
        self.run = run
        self.heads = list(run.team.steps)
        self.colors = F.head_colors(run.ws.heads)
        self.boxes = {h: W.HTML() for h in self.heads}
        self.status = W.HTML()
        self.widget = W.VBox([self.status, *self.boxes.values()])
        self.widget.add_class("mh-team-view")
        self._t0 = time.monotonic()
        self.update()
        self._start(interval)

    def update(self) -> bool:
        outputs = self.run.outputs
        for head in self.heads:
            text = outputs.get(head, "")
            value = _stream_html(head, text, self.colors.get(head, "#999"))
            if self.boxes[head].value != value:
                self.boxes[head].value = value
        run = self.run
        state = "failed: " + str(run.error) if run.error else ("done" if run.done else "running")
        self.status.value = (f'<span class="mh-status" data-state="{html.escape(state.split(":")[0])}">team run '
                             f"{run.id}: {html.escape(state)} · {time.monotonic() - self._t0:.1f} s</span>")
        return True

    def _finished(self) -> bool:
        return self.run.done

    def finish(self) -> None:
        self.stop()


def dashboard(ws, interval: float = 0.1, **options):
    """A live `Dashboard` inside a kernel; elsewhere a `StaticDashboard` of plotly figures."""
    if not widgets_available():
        return StaticDashboard(ws)
    return Dashboard(ws, interval=interval, **options)


def live_team_view(run, interval: float = 0.1) -> TeamView | None:
    """Display a `TeamView` of `run` inside a kernel; None where widgets cannot render."""
    if not widgets_available():
        return None
    from IPython.display import display

    view = TeamView(run, interval=interval)
    display(view.widget)
    return view
