"""Bus and teams: streamed handoff exactness, team == one by one, prefill overlap, errors, the bus itself."""

import asyncio
import threading

import pytest

from helpers import make_ws, tight_pool
from multihead_nb.workspace.bus import Bus
from multihead_nb.errors import TeamError
from multihead_nb.team.team import Step
from multihead_nb.team.workflows import CODE, CREATIVE, RESEARCH


@pytest.fixture(scope="module")
def models(tiny_ckpt):
    return {
        "a": str(tiny_ckpt("llama")),
        # another architecture AND another tokenizer: the handoff must pass text and re-tokenize
        "c": str(tiny_ckpt("qwen3", tokenizer_vocab=300, seed=3)),
    }


def code_team(ws, models, reviewer_model=None, max_tokens=24):
    opts = dict(max_tokens=max_tokens, ignore_eos=True)
    ws.add_head("coder", models["a"], system=CODE.systems["coder"], **opts)
    ws.add_head("reviewer", reviewer_model or models["a"], system=CODE.systems["reviewer"], **opts)
    ws.add_head("documenter", models["a"], system=CODE.systems["documenter"], **opts)
    return ws.team(CODE.steps)


def test_streamed_prompt_equals_waiting_prompt_same_tokenizer(models):
    ws = make_ws()
    team = code_team(ws, models)
    run = team.run(task="reverses a list")
    for head in ("reviewer", "documenter"):
        assert run.prompt_ids(head) == run.reference_prompt_ids(head)
        coder_ids = run.timeline().set_index("head").loc["coder"]
        assert coder_ids.output_tokens == 24
    # the coder's ids were passed through as they are
    coder = run._targets[team.final_instances()["coder"]].handle.request.output_ids
    rev = run.prompt_ids("reviewer")
    assert any(rev[i : i + len(coder)] == coder for i in range(len(rev)))
    ws.pool.check()
    ws.close()


def test_streamed_prompt_equals_waiting_prompt_across_tokenizers(models):
    ws = make_ws()
    team = code_team(ws, models, reviewer_model=models["c"], max_tokens=40)
    assert not ws.tokenizer("coder").get_vocab() == ws.tokenizer("reviewer").get_vocab()
    run = team.run(task="sorts words by length")
    assert run.prompt_ids("reviewer") == run.reference_prompt_ids("reviewer")
    coder_text = run.outputs["coder"]
    assert coder_text
    # the reviewer's prompt holds the coder's text, re-tokenized by the reviewer's tokenizer
    assert coder_text in ws.tokenizer("reviewer").decode(run.prompt_ids("reviewer"))
    ws.close()


def test_team_equals_one_by_one(models):
    ws = make_ws()
    team = code_team(ws, models)
    run = team.run(task="parses a date")
    one_by_one = team.sequential(task="parses a date")
    finals = team.final_instances()
    assert {h: one_by_one[i].text for h, i in finals.items()} == run.outputs
    assert {h: one_by_one[i].token_ids for h, i in finals.items()} == {
        h: run._targets[i].handle.request.output_ids for h, i in finals.items()
    }
    ws.close()


def test_downstream_prefill_overlaps_upstream_decode(models):
    ws = make_ws(max_batched_tokens=256)
    team = code_team(ws, models, max_tokens=32)
    run = team.run(task="counts vowels")
    tok = run.tokens
    assert {"team_step", "round", "team_run"} <= set(tok.columns)
    coder_last = tok[tok["head"] == "coder"].step.max()
    for head in ("reviewer", "documenter"):
        first = tok[tok["head"] == head].step.min()
        assert first - coder_last <= 2, (head, first, coder_last)
    # while the coder decoded, the reviewer's growing prompt was computed in the same steps
    steps = run.steps
    both = steps.tokens_by_head.apply(lambda d: "coder" in d and "reviewer" in d)
    assert both.sum() >= 10
    tl = run.timeline()
    assert list(tl.columns[:6]) == ["head", "round", "request", "start", "first_token", "end"]
    assert len(run.messages) > 0
    ws.close()


def test_refine_loop_rounds(models):
    ws = make_ws()
    for h, system in CREATIVE.systems.items():
        ws.add_head(h, models["a"], system=system, max_tokens=12, ignore_eos=True)
    team = ws.team(CREATIVE.steps)
    assert sorted((i.head, i.round) for i in team.instances) == [
        ("editor", 1), ("ideator", 1), ("writer", 1), ("writer", 2)
    ]
    run = team.run(**CREATIVE.variables)
    tl = run.timeline()
    assert len(tl) == 4 and tl.finish_reason.eq("length").all()
    w1 = run._targets[[i for i in run._targets if i.head == "writer" and i.round == 1][0]].handle.request
    e1 = run._targets[[i for i in run._targets if i.head == "editor"][0]].handle.request
    w2_prompt = run.prompt_ids("writer", 2)
    for out in (w1.output_ids, e1.output_ids):
        assert any(w2_prompt[i : i + len(out)] == out for i in range(len(w2_prompt)))
    assert run.prompt_ids("writer", 2) == run.reference_prompt_ids("writer", 2)
    ws.close()


def test_research_workflow_chain(models):
    ws = make_ws()
    team = RESEARCH.setup(ws, models["a"], max_tokens=10, ignore_eos=True)
    run = team.run(**RESEARCH.variables)
    assert set(run.outputs) == {"researcher", "summarizer", "critic"}
    assert all(run.outputs.values())
    ws.close()


def test_team_errors_before_running(models):
    ws = make_ws()
    code_team(ws, models)
    free = ws.pool.num_free
    with pytest.raises(TeamError, match="cycle"):
        ws.team({"coder": "fix {reviewer}", "reviewer": "review {coder}"})
    with pytest.raises(TeamError, match="no head"):
        ws.team({"ghost": "hello {task}"})
    with pytest.raises(TeamError, match="missing team variable.*task"):
        ws.team(CODE.steps).run()
    with pytest.raises(TeamError, match="documenter.*not a step"):
        ws.team({"coder": "x {task}", "reviewer": "{documenter}"})
    assert ws.pool.num_free == free and ws.engine.step_count == 0
    ws.close()


def test_invalid_json_against_schema_fails_the_run(models):
    ws = make_ws()
    code_team(ws, models, max_tokens=8)
    team = ws.team({"coder": "Write {task}", "reviewer": Step("Rate this as JSON: {coder}", schema={"score": int})})
    free = ws.pool.num_free
    with pytest.raises(TeamError, match="reviewer.*invalid JSON"):
        team.run(task="a sort")
    assert ws.pool.num_free == free
    ws.close()


def test_json_schema_validation_unit():
    from multihead_nb.team.json_output import parse_json_output

    assert parse_json_output('```json\n{"score": 3}\n```', {"score": int}) == {"score": 3}
    with pytest.raises(ValueError, match="score"):
        parse_json_output('{"score": "high"}', {"score": int})
    with pytest.raises(ValueError, match="missing field"):
        parse_json_output("{}", {"score": int})


def test_failing_head_mid_run_names_it_and_frees_pages(models):
    ws = make_ws(pool=tight_pool(models["a"], 24), page_bytes="4KiB")
    code_team(ws, models, max_tokens=8)
    free = ws.pool.num_free
    tpp = ws.scheduler.layouts[ws.heads["coder"].model].tokens_per_page
    team = ws.team({
        "coder": "Write {task}",
        "reviewer": Step("Review {coder}", options={"max_tokens": free * tpp + 50}),  # outgrows the pool
        "documenter": "Document {coder}",
    })
    with pytest.raises(TeamError, match="reviewer.*failed.*pages"):
        team.run(task="anything")
    assert ws.pool.num_free == free
    ws.pool.check()
    assert ws.generate("reviewer", "still alive", max_tokens=3).token_ids
    ws.close()


def test_cancel_run(models):
    ws = make_ws()
    team = code_team(ws, models, max_tokens=200)
    free = ws.pool.num_free
    run = team.start(task="x")
    for _ in range(5):
        ws.engine.step()
    run.cancel()
    assert run.done and ws.pool.num_free == free
    ws.close()


# ---- the bus on its own -------------------------------------------------------------------------------------


def test_bus_order_subscribers_and_unsubscribe():
    bus = Bus()
    a, b = bus.subscribe("t"), bus.subscribe("t")
    seen = []
    cb = bus.subscribe("t", callback=seen.append)
    for i in range(100):
        bus.publish("t", f"m{i}", sender="x")
    bus.publish("other", {"k": 1})
    a.close()
    bus.publish("t", "after")
    b.close()
    assert [m.payload for m in a] == [f"m{i}" for i in range(100)]
    assert [m.payload for m in b] == [f"m{i}" for i in range(100)] + ["after"]
    assert [m.payload for m in seen] == [f"m{i}" for i in range(100)] + ["after"]
    cb.close()
    log = bus.messages()
    assert len(log) == 102 and log.seq.is_monotonic_increasing
    assert log[log.topic == "other"].kind.item() == "json"
    assert bus.publish("t", [1, 2, 3]).kind == "tokens"


def test_bus_threads_and_async():
    bus = Bus()
    sub = bus.subscribe("*")

    def producer(name):
        for i in range(50):
            bus.publish(name, i, kind="json")

    threads = [threading.Thread(target=producer, args=(f"p{k}",)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    sub.close()
    got = list(sub)
    assert len(got) == 200
    for k in range(4):
        assert [m.payload for m in got if m.topic == f"p{k}"] == list(range(50))

    async def consume():
        s = bus.subscribe("async")
        bus.publish("async", "one")
        bus.publish("async", "two")
        s.close()
        return [m.payload async for m in s]

    assert asyncio.run(consume()) == ["one", "two"]


def test_heads_publish_their_stream(models):
    ws = make_ws()
    ws.add_head("a", models["a"])
    sub = ws.bus.subscribe("a")
    c = ws.generate("a", "hello", max_tokens=6, ignore_eos=True)
    sub.close()
    msgs = list(sub)
    assert [m.kind for m in msgs] == ["tokens"] * 6 + ["end"]
    assert [m.payload[0] for m in msgs[:-1]] == c.token_ids
    assert msgs[-1].finish_reason == "length" and msgs[-1].text == c.text
    ws.close()
