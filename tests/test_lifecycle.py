"""A request's whole life, at its edges: remove/close/cancel right after a submit, Ctrl-C at every point of a step,
empty prompts, one request's failure contained, history bounded. After each: no handle unfinished, no page held by
a finished or removed request, `pool.check()` passes, and the engine serves new requests."""

from __future__ import annotations

import _thread
import random
import signal
import threading
import time
import weakref

import pytest

from helpers import make_ws
from multihead_nb.engine import engine as engine_module
from multihead_nb.errors import ConfigError, MultiHeadError, RequestError

IDS = [5, 17, 42, 99, 7, 12]


@pytest.fixture(scope="module")
def models(tiny_ckpt):
    return {"a": str(tiny_ckpt("llama")), "b": str(tiny_ckpt("qwen2"))}


def two_heads(models, **kw):
    ws = make_ws(**kw)
    ws.add_head("x", models["a"], max_tokens=6)
    ws.add_head("y", models["b"], max_tokens=6)
    return ws


def assert_clean(ws):
    """Nothing left: no live request, no K/V page held, the pool consistent, and a new request is served."""
    ws.sync()
    assert ws.engine.live_requests() == []
    assert ws.pool.usage()["kv"] == 0, ws.pool.usage()
    ws.pool.check()
    assert len(ws.generate("y", IDS, max_tokens=2).token_ids) == 2


@pytest.mark.parametrize("background", [False, True])
def test_remove_head_right_after_submit_ends_the_request(models, background):
    ws = two_heads(models, background=background)
    h = ws.submit("x", IDS)  # still in the engine's inbox (inline) or just admitted (background)
    ws.remove_head("x")
    assert h.request.done_event.wait(5) and h.done
    assert h.result().finish_reason == "cancelled"
    assert "x" not in ws.heads and "x" not in ws.scheduler.heads
    ws.add_head("x", models["a"], max_tokens=3)  # the name is free again
    assert len(ws.generate("x", IDS).token_ids) == 3
    assert_clean(ws)
    ws.close()


def test_a_request_reaching_the_engine_after_its_head_was_removed_fails_alone(models):
    """The race: `submit_ids` checked the head, then `remove_head` completed before the engine saw the request."""
    from multihead_nb.engine.request import Request
    from multihead_nb.engine.sampling import SamplingParams
    from multihead_nb.workspace.handles import RequestHandle

    ws = two_heads(models, background=True)
    other = ws.submit("y", IDS, max_tokens=20, ignore_eos=True)
    model = ws.heads["x"].model
    ws.remove_head("x")
    late = Request(id=10_000, head="x", model=model, prompt_ids=list(IDS), params=SamplingParams(), arrival=ws.now())
    ws.engine.submit(late)
    with pytest.raises(RequestError, match="head 'x' .*not defined"):
        RequestHandle(ws.engine, late).result(timeout=10)
    assert len(other.result(timeout=30).token_ids) == 20 and other.request.finish_reason == "length"
    assert ws.engine.crashed is None and ws.engine.background
    assert_clean(ws)
    ws.close()


@pytest.mark.parametrize("background", [False, True])
def test_close_right_after_submits_ends_every_handle(models, background):
    ws = two_heads(models, background=background)
    handles = [ws.submit("x" if i % 2 else "y", IDS, max_tokens=50, ignore_eos=True) for i in range(30)]
    ws.close()
    assert all(h.done for h in handles)
    for h in handles:
        c = h.result(timeout=1)
        assert c.finish_reason in ("cancelled", "length")
    assert ws.pool.usage()["kv"] == 0 and ws.pool.usage()["weights"] == 0
    ws.pool.check()
    with pytest.raises(ConfigError, match="closed"):
        ws.submit("x", IDS)


def test_close_drops_the_arena(models):
    ws = two_heads(models)
    ws.generate("x", IDS)
    arena = weakref.ref(ws.arena.data)
    ws.close()
    import gc

    gc.collect()
    assert arena() is None and ws.arena is None and "closed" in repr(ws)


def test_submit_racing_close_from_another_thread_never_strands_a_handle(models):
    ws = two_heads(models, background=True)
    handles, stop = [], threading.Event()

    def submitter():
        while not stop.is_set():
            try:
                handles.append(ws.submit("x", IDS, max_tokens=30, ignore_eos=True))
            except MultiHeadError:
                return

    t = threading.Thread(target=submitter)
    t.start()
    time.sleep(0.2)
    ws.close()
    stop.set()
    t.join(10)
    assert handles and all(h.request.done_event.wait(5) for h in handles)
    assert ws.pool.usage()["kv"] == 0
    ws.pool.check()


# ---- Ctrl-C at every point of a step (inline mode) --------------------------------------------------------
def interrupt_points():
    from multihead_nb.engine.scheduler import Scheduler

    E = engine_module.Engine
    return {"drain": (E, "_drain_inbox"), "schedule": (Scheduler, "schedule"), "forward": (engine_module, "run_plan"),
            "advance": (Scheduler, "advance"), "append": (E, "_append_token"), "deliver": (E, "_deliver")}


@pytest.mark.parametrize("point", ["drain", "schedule", "forward", "advance", "append", "deliver"])
def test_an_interrupt_at_any_point_of_a_step_cancels_only_the_callers_request(models, monkeypatch, point):
    ws = two_heads(models)
    others = [ws.submit("y", IDS, max_tokens=8, ignore_eos=True), ws.submit("x", IDS[:3], max_tokens=8, ignore_eos=True)]
    mine = ws.submit("x", IDS, max_tokens=8, ignore_eos=True)
    for _ in range(2):
        ws.engine.step()  # everyone is running
    holder, name = interrupt_points()[point]
    original = getattr(holder, name)
    fired = []

    def interrupted(*args, **kwargs):
        if not fired:
            fired.append(1)
            signal.raise_signal(signal.SIGINT)  # a real Ctrl-C, arriving right here
        return original(*args, **kwargs)

    monkeypatch.setattr(holder, name, interrupted)
    with pytest.raises(KeyboardInterrupt):
        mine.result()
    monkeypatch.setattr(holder, name, original)
    assert fired and mine.done and mine.request.finish_reason == "cancelled"
    for h in others:  # untouched: they run to the end with every token
        c = h.result(timeout=30)
        assert c.finish_reason == "length" and len(c.token_ids) == 8
    assert_clean(ws)


def test_a_seeded_loop_of_real_interrupts_strands_nothing(models):
    ws = two_heads(models)
    rng = random.Random(1)
    interrupted = 0
    handles = []
    for i in range(25):
        handles += [ws.submit("x" if rng.random() < 0.5 else "y", IDS[: rng.randint(1, 6)], max_tokens=rng.randint(2, 10),
                              ignore_eos=True) for _ in range(2)]
        timer = threading.Timer(rng.uniform(0.0, 0.02), _thread.interrupt_main)
        try:
            timer.start()  # a short delay can fire before start() returns
            handles[-1].result(timeout=30)
            timer.join()  # an interrupt that arrives after result() returned lands here or in the sleep
            time.sleep(0.01)
        except KeyboardInterrupt:
            interrupted += 1
        timer.join()
    for h in handles:
        h.request.done_event.is_set() or h.result(timeout=30)
    assert interrupted > 0 and all(h.done for h in handles)
    assert_clean(ws)


# ---- bad input and containment ----------------------------------------------------------------------------
def test_an_empty_prompt_is_refused(models):
    ws = two_heads(models)
    with pytest.raises(RequestError, match="empty"):
        ws.submit_ids("x", [])
    assert_clean(ws)


@pytest.mark.parametrize("bad,match", [
    (dict(temperature=float("nan")), "temperature must be a finite number"),
    (dict(temperature=float("inf")), "temperature must be a finite number"),
    (dict(temperature=1e6), "temperature must be <= 100"),
    (dict(top_p=float("nan")), "top_p must be a finite number"),
    (dict(stop=5), "stop must be a string or a list of strings"),
])
def test_bad_sampling_options_are_refused_at_submit(models, bad, match):
    ws = two_heads(models)
    with pytest.raises(ConfigError, match=match):
        ws.submit("x", IDS, **bad)
    assert_clean(ws)


def test_a_tiny_temperature_samples_greedily(models):
    ws = two_heads(models)
    assert ws.generate("x", IDS, temperature=1e-38).token_ids == ws.generate("x", IDS).token_ids


def test_one_requests_sampling_failure_fails_it_alone(models, monkeypatch):
    from multihead_nb.engine import sampler

    original = sampler._sample_row

    def fragile(row, p, g):
        if p.seed == 666:
            raise RuntimeError("probability tensor contains either inf, nan or element < 0")
        return original(row, p, g)

    monkeypatch.setattr(sampler, "_sample_row", fragile)
    ws = two_heads(models)
    good = [ws.submit(h, IDS, temperature=0.8, seed=i, max_tokens=5, ignore_eos=True) for i, h in enumerate("xyxy")]
    bad = ws.submit("x", IDS, temperature=0.8, seed=666)
    with pytest.raises(RequestError, match="sampling failed for request .*inf, nan"):
        bad.result()
    assert all(len(h.result().token_ids) == 5 for h in good)
    assert_clean(ws)


def test_a_failing_forward_fails_its_models_requests_and_is_recorded(models, monkeypatch):
    ws = two_heads(models, background=True)
    runner = ws.models[ws.heads["x"].model].runner
    monkeypatch.setattr(runner, "forward", lambda batch: (_ for _ in ()).throw(RuntimeError("device lost")))
    x = ws.submit("x", IDS)
    y = ws.submit("y", IDS, max_tokens=4, ignore_eos=True)
    with pytest.raises(RequestError, match="forward pass of .* failed: RuntimeError: device lost"):
        x.result(timeout=30)
    assert len(y.result(timeout=30).token_ids) == 4
    monkeypatch.undo()
    assert ws.engine.crashed is None
    assert_clean(ws)
    ws.close()


def test_a_crashing_step_is_recorded_and_the_engine_keeps_serving(models, monkeypatch):
    ws = two_heads(models, background=True)
    calls = []
    original = engine_module.Engine._step

    def flaky(self):
        if not calls:
            calls.append(1)
            raise RuntimeError("a bug outside the step's own containment")
        return original(self)

    monkeypatch.setattr(engine_module.Engine, "_step", flaky)
    assert len(ws.generate("x", IDS, max_tokens=3, ignore_eos=True).token_ids) == 3
    assert calls and any("a bug outside" in e for e in ws.stats()["errors"])
    ws.close()


# ---- bounded history ----------------------------------------------------------------------------------------
def test_history_is_bounded_and_results_keep_their_own_rows(models):
    ws = two_heads(models, history=20)
    runs = [ws.generate("x", IDS, max_tokens=10, ignore_eos=True) for _ in range(5)]
    assert all(list(c.tokens["index"]) == list(range(10)) for c in runs)
    assert len(ws.tokens()) == 20 and ws.stats()["history"]["dropped_tokens"] == 30
    assert len(ws.bus.messages()) <= 20
    run = ws.team({"x": "{task}", "y": "Review: {x}"}).run(task="hello")
    ws.clear_history()
    assert len(ws.tokens()) == 0 and len(ws.steps()) == 0 and len(ws.bus.messages()) == 0
    assert set(run.tokens["team_step"]) == {"x", "y"}  # the run keeps its own token frame
    assert_clean(ws)


def test_greedy_is_torchs_argmax():
    """The engine's greedy pick (numpy's argmax on the CPU, for speed) is torch's: the first of equal maxima, a NaN
    before any number, any dtype and device torch's own path takes."""
    import torch

    from multihead_nb.engine.sampler import greedy

    g = torch.Generator().manual_seed(3)
    x = torch.randn(5, 1000, generator=g)
    x[1, 10] = x[1, 900] = 50.0  # ties: the first
    x[2, 7] = float("nan")
    x[3, :] = 0.0
    x[4, 999] = float("inf")
    for t in (x, x.double(), x.bfloat16(), x[:, ::2]):
        assert greedy(t) == t.argmax(dim=-1).tolist(), t.dtype
    assert greedy(x)[1] == 10 and greedy(x)[2] == 7 and greedy(x)[3] == 0 and greedy(x)[4] == 999
