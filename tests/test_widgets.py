"""Widgets and figures without a browser: the page map's data, the figures' traces, the live dashboard, the
static fallback."""

import time

import pandas as pd
import plotly.graph_objects as go
import pytest

import multihead_nb as mh
from multihead_nb.notebook.widgets import figures as F
from multihead_nb.notebook.widgets.dashboard import Dashboard, StaticDashboard, TeamView, dashboard, widgets_available
from multihead_nb.notebook.widgets.page_map import PageMap, decode_pages, encode_pages


@pytest.fixture(scope="module")
def model(tiny_ckpt):
    return str(tiny_ckpt("llama"))


@pytest.fixture
def ws(model):
    w = mh.Workspace(device="cpu", dtype="float32", pool="8MiB", page_bytes="8KiB", background=True)
    w.add_head("coder", model, system="You write Python. " * 20, max_tokens=24)
    w.add_head("reviewer", model, system="You review code.", max_tokens=24)
    w.add_head("documenter", model, system="You document code.", max_tokens=24)
    yield w
    w.close()


def team(ws):
    return ws.team({"coder": "Write {task}", "reviewer": "Review {coder}", "documenter": "Document {coder}"})


def test_page_map_data_equals_pages_after_a_run(ws):
    pm = PageMap(ws)
    seen = set()

    def look(event, req, _):  # refresh from inside the engine's steps: deterministic however fast the run is
        if event == "token":
            pm.refresh()
            seen.update(pm.data.loc[pm.data.state == "kv", "owner"])

    ws.engine.listeners.append(look)
    run = team(ws).start(task="a sort")
    run.wait()
    ws.engine.listeners.remove(look)
    pm.refresh()
    pd.testing.assert_frame_equal(pm.data, ws.pages())
    assert seen == {"coder", "reviewer", "documenter"}  # while the team ran, every head held pages
    assert set(pm.colors) >= {"coder", "reviewer", "documenter", "weights", "free"}


def test_page_encoding_roundtrip():
    df = pd.DataFrame({"page": [0, 1, 2], "state": ["weights", "kv", "free"], "owner": ["weights", "a", None],
                       "holders": ["", "a,b", ""], "model": ["m", "m", None], "tokens": [0, 5, 0],
                       "shared": [1, 2, 0]})
    cols, labels = encode_pages(df)
    pd.testing.assert_frame_equal(decode_pages(cols, labels), df)


def test_figures_have_the_expected_traces(ws):
    run = team(ws).run(task="a sort")
    tl = F.timeline_figure(run.timeline(), run.tokens, ws.steps())
    bars = [t for t in tl.data if t.type == "bar"]
    assert sorted(t.name for t in bars) == ["coder", "documenter", "reviewer"]  # one bar trace per head
    assert all(set(t.y) == {t.name} and len(t.x) == 3 for t in bars)  # waiting, prefill, decode
    assert all(x >= 0 for t in bars for x in t.x)
    plot = run.plot()
    assert isinstance(plot, go.Figure) and len([t for t in plot.data if t.type == "bar"]) == 3

    pages = ws.pages()
    pm = F.page_map_figure(pages)
    assert sum(len(t.x) for t in pm.data) == len(pages)
    assert {t.meta["kind"] for t in pm.data} == {"weights", "cached", "free"}  # all K/V freed after the run
    q = F.queues_figure(ws.stats())
    assert [t.name for t in q.data] == ["running", "waiting", "preempted"] and list(q.data[0].x) == list(ws.heads)
    tps = F.tokens_per_s_figure(ws.tokens())
    assert {t.name for t in tps.data} == set(ws.heads)
    tl2 = F.timeline_from_tokens(ws.tokens())
    assert list(tl2["head"]) == list(run.timeline()["head"])


def test_page_map_figure_marks_shared_pages():
    df = pd.DataFrame({"page": range(4), "state": ["kv", "kv", "cached", "free"], "owner": ["a", "b", None, None],
                       "holders": ["a,b", "b", "", ""], "model": ["m", "m", "m", None], "tokens": [16, 3, 16, 0],
                       "shared": [2, 1, 0, 0]})
    fig = F.page_map_figure(df)
    a = next(t for t in fig.data if t.meta.get("head") == "a")
    assert a.marker.line.width == (2,) and "shared by 2" in a.text[0]


def test_workflow_table_figure():
    df = pd.DataFrame({"system": ["sequential", "multihead"] * 3, "workflow": ["code"] * 2 + ["research"] * 2 +
                       ["creative"] * 2, "rep": 0, "wall_s": [3.0, 1.0, 4.0, 2.0, 5.0, 2.5]})
    fig = F.workflow_table_figure(df)
    assert {t.meta["kind"] for t in fig.data} == {"measured", "article"} and len(fig.data) == 4
    art = next(t for t in fig.data if t.name == "sequential (MultiHead article)")
    assert list(art.y) == [14.2, 18.7, 22.5]


def test_dashboard_updates_live_and_stops(ws):
    d = Dashboard(ws, interval=0.02)
    assert d.running
    frames = d.frames
    run = team(ws).run(task="a sort")
    deadline = time.monotonic() + 30
    while d.frames == frames and time.monotonic() < deadline:
        time.sleep(0.02)
    assert d.frames > frames  # the thread refreshed while the run went
    d.stop()
    assert not d.running and not d.errors
    pd.testing.assert_frame_equal(d.page_map.data, ws.pages())
    assert sorted(t.name for t in d.timeline.data if t.type == "bar") == ["coder", "documenter", "reviewer"]
    assert set(d.streams) == set(ws.heads)
    assert run.outputs["coder"][-20:].replace("&", "&amp;")[-5:] in d.streams["coder"].value or not run.outputs["coder"]
    assert d._sub.closed


def test_team_view_follows_a_run(ws):
    run = team(ws).start(task="a sort")
    view = TeamView(run, interval=0.02)
    run.wait()
    view.finish()
    assert not view.running and set(view.boxes) == {"coder", "reviewer", "documenter"}
    assert 'data-state="done"' in view.status.value
    assert all(f'data-head="{h}"' in view.boxes[h].value for h in view.boxes)


def test_fallback_without_a_kernel_returns_static_figures(ws):
    assert not widgets_available()
    d = dashboard(ws)
    assert isinstance(d, StaticDashboard) and not d.live
    assert all(isinstance(f, go.Figure) for f in d.figures.values())
    assert set(d.figures) == {"page_map", "queues", "timeline", "tokens_per_s"}
    d.stop()
    assert isinstance(ws.dashboard(), StaticDashboard)
