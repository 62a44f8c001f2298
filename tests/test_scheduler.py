"""The scheduler's policy alone: real `PagePool`s and `Request`s, no model. The test plays the engine (plan, commit,
append a sampled token, remove finished requests) and checks VTC order and weights, idle heads, concurrency, the
token budget and chunking, victim choice, requests that can never fit, rollback and the head lifecycle."""

import pytest
import torch

from multihead_nb.engine.plan import Failure
from multihead_nb.engine.request import Request, Status
from multihead_nb.engine.sampling import SamplingParams
from multihead_nb.engine.scheduler import Scheduler
from multihead_nb.errors import ConfigError, RequestError
from multihead_nb.memory import KVLayout, PagePool

TPP = 4
LAYOUT = KVLayout(num_layers=1, num_kv_heads=1, head_dim=1, dtype=torch.float32, page_bytes=8 * TPP)


class Fixture:
    def __init__(self, pages=64, max_batched_tokens=512, max_seqs=128, max_context=1 << 30, **heads):
        self.sched = Scheduler(PagePool(pages), max_batched_tokens=max_batched_tokens, max_seqs=max_seqs)
        self.sched.add_model("m", LAYOUT, max_context=max_context)
        self.next_id = 0
        for name, kw in heads.items():
            self.sched.add_head(name, "m", **kw)

    def req(self, head, n_prompt, max_tokens=1000, model="m", prompt_open=False, add=True):
        self.next_id += 1
        r = Request(self.next_id, head, model, [(self.next_id * 31 + i) % 97 for i in range(n_prompt)],
                    SamplingParams(max_tokens=max_tokens), 0.0, prompt_open=prompt_open)
        if add:
            self.sched.add(r)
        return r

    def step(self):
        """One engine step without a model: plan, commit, sample token 7, remove what is done."""
        plan = self.sched.schedule()
        self.sched.advance(plan)
        for c in plan.chunks:
            if c.sample:
                c.request.output_ids.append(7)
                if len(c.request.output_ids) >= c.request.params.max_tokens:
                    self.sched.remove(c.request)
        return plan

    def served(self):
        return {n: q.served for n, q in self.sched.heads.items()}


def heads_of(plan):
    return [c.request.head for c in plan.chunks]


def test_vtc_serves_the_least_served_head_first():
    f = Fixture(max_batched_tokens=4, a={}, b={}, c={})
    for h in "abc":
        f.req(h, 4)
    assert [heads_of(f.step()) for _ in range(4)] == [["a"], ["b"], ["c"], ["a", "b", "c"]]
    assert {n: q.counter for n, q in f.sched.heads.items()} == {"a": 5, "b": 5, "c": 5}


def test_weights_share_the_budget_1_to_3():
    f = Fixture(max_batched_tokens=4, max_seqs=4, light={"weight": 1}, heavy={"weight": 3})
    for _ in range(40):
        f.req("light", 1)
        f.req("heavy", 1)
    start = f.served()
    for _ in range(40):
        f.step()
    got = {h: f.served()[h] - start[h] for h in start}
    assert got["light"] + got["heavy"] == 160
    assert 2.7 <= got["heavy"] / got["light"] <= 3.3, got


def test_a_head_back_from_idle_brings_no_credit():
    f = Fixture(max_batched_tokens=4, max_seqs=4, busy={}, idle={})
    for _ in range(4):
        f.req("busy", 1)
    for _ in range(50):
        f.step()
    busy = f.sched.heads["busy"]
    assert busy.counter >= 190 and f.sched.heads["idle"].counter == 0
    for _ in range(4):
        f.req("idle", 1)
    assert f.sched.heads["idle"].counter == busy.counter  # lifted to the least counter of the heads with work
    start = f.served()
    for _ in range(20):
        f.step()
    got = {h: f.served()[h] - start[h] for h in start}
    assert abs(got["idle"] - got["busy"]) <= 8, got  # shared from now on; without the lift "idle" takes all 80


def test_max_concurrent_caps_running_requests():
    f = Fixture(capped={"max_concurrent": 2}, free={})
    capped = [f.req("capped", 3, max_tokens=3) for _ in range(5)]
    others = [f.req("free", 3, max_tokens=3) for _ in range(5)]
    peak = 0
    for _ in range(30):
        f.step()
        peak = max(peak, len(f.sched.heads["capped"].running))
    assert peak == 2 and len(f.sched.heads["free"].running) == 0
    assert all(len(r.output_ids) == 3 for r in capped + others)
    assert max(r.num_preemptions for r in capped) == 0


def test_token_budget_chunks_a_long_prompt_and_samples_once():
    f = Fixture(max_batched_tokens=4, a={})
    r = f.req("a", 10)
    plans = [f.step() for _ in range(3)]
    assert [(c.num_tokens, c.sample) for p in plans for c in p.chunks] == [(4, False), (4, False), (2, True)]
    assert r.num_computed == 10 and r.output_ids == [7]
    f = Fixture(max_batched_tokens=6, max_seqs=2, a={}, b={})
    rs = [f.req(h, 5) for h in "aab"]
    plan = f.step()
    assert sum(c.num_tokens for c in plan.chunks) <= 6 and len(plan.chunks) == 2
    assert [(c.request, c.num_tokens) for c in plan.chunks] == [(rs[0], 5), (rs[2], 1)]


def test_an_open_prompt_is_prefilled_but_not_sampled():
    f = Fixture(a={})
    r = f.req("a", 6, prompt_open=True)
    plan = f.step()
    assert [(c.num_tokens, c.sample) for c in plan.chunks] == [(6, False)] and r.output_ids == []
    assert f.step().chunks == []  # nothing new known
    r.prompt_ids += [1, 2]
    r.prompt_open = False
    assert [(c.num_tokens, c.sample) for c in f.step().chunks] == [(2, True)]


def fill_two_pages_each(f, heads):
    """Admit one request per entry of `heads` with 7 prompt tokens (2 pages each), then decode one token each:
    the next token of every request needs a third page."""
    reqs = [f.req(h, 7) for h in heads]
    f.step()
    f.step()
    assert all(len(r.block_table) == 2 and r.num_computed == 8 for r in reqs)
    return reqs


def test_the_victim_is_the_newest_request_of_the_most_served_head_of_the_same_pool():
    f = Fixture(pages=6, a={}, b={})
    region = PagePool(16)
    f.sched.add_model("r", LAYOUT, pool=region)
    f.sched.add_head("r", "r")
    rr = f.req("r", 40, model="r")  # the most served head, but its pages come from another pool
    a1, b1, a2 = fill_two_pages_each(f, ["a", "b", "a"])
    assert f.sched.pool.num_free == 0 and f.sched.heads["r"].counter > f.sched.heads["a"].counter
    assert f.sched.heads["a"].counter > f.sched.heads["b"].counter
    plan = f.step()  # b runs first (least served), needs a page: a's newest request gives way
    assert a2.status == Status.WAITING and a2.num_preemptions == 1 and a2.block_table == []
    assert f.sched.heads["a"].waiting[0] is a2 and a2 not in [c.request for c in plan.chunks]
    assert len(b1.block_table) == 3 and len(a1.block_table) == 3 and a1.num_preemptions == 0
    assert rr.num_preemptions == 0 and len(rr.block_table) == 11
    f.sched.pool.check()


def test_a_head_whose_quota_binds_preempts_its_own_request():
    f = Fixture(pages=32, a={"quota_pages": 4}, b={})
    b1 = f.req("b", 30)  # more served than a, holding 8 pages; 20 pages stay free
    a1, a2 = fill_two_pages_each(f, ["a", "a"])
    assert f.sched.heads["b"].counter > f.sched.heads["a"].counter and f.sched.pool.num_free == 20
    f.step()
    assert a2.num_preemptions == 1 and a2.status == Status.WAITING and len(a1.block_table) == 3
    assert f.sched.pool.held_by("a") == 3 and b1.num_preemptions == 0 and b1.status == Status.RUNNING


def test_the_most_served_head_gives_way_first():
    f = Fixture(pages=6, a={}, b={}, c={})
    f.req("a", 12, max_tokens=1)
    f.req("b", 6, max_tokens=1)
    f.step()  # both done: a served 12, b 6, c nothing
    c1, b1, a1 = fill_two_pages_each(f, ["c", "b", "a"])  # c first: nobody has work, so nobody is lifted
    counters = [f.sched.heads[h].counter for h in "abc"]
    assert counters == sorted(counters, reverse=True) and len(set(counters)) == 3 and f.sched.pool.num_free == 0
    f.step()  # c runs first and needs a page: a gives way (b is served more than c, but less than a)
    assert a1.num_preemptions == 1 and b1.num_preemptions == 0 and len(c1.block_table) == 3


def test_a_request_that_never_fits_is_removed_and_reported():
    f = Fixture(pages=4, a={}, b={"quota_pages": 2})
    big = f.req("a", 20)
    ok = f.req("a", 3, max_tokens=2)
    plan = f.step()
    assert [(x.request, type(x)) for x in plan.failed] == [(big, Failure)]
    assert "needs 6 pages for 21 tokens" in plan.failed[0].message and "the pool holds only 4" in plan.failed[0].message
    assert big.status == Status.WAITING and big.error is None and big.finish_reason is None  # the engine's to set
    assert big not in f.sched.requests() and [c.request for c in plan.chunks] == [ok]
    grows = f.req("b", 7)  # fits its quota of 2 pages, until its second token
    f.step()
    f.step()
    assert len(grows.block_table) == 2
    plan = f.step()
    assert [x.request for x in plan.failed] == [grows] and "its quota holds only 2" in plan.failed[0].message
    assert grows.block_table == [] and grows not in f.sched.requests() and f.sched.pool.num_free == 4
    f.sched.pool.check()


def test_a_prompt_past_the_models_context_is_reported():
    f = Fixture(max_context=8, a={})
    long, fits = f.req("a", 8), f.req("a", 7)
    plan = f.step()
    assert [x.request for x in plan.failed] == [long] and "8-token context" in plan.failed[0].message
    assert [c.request for c in plan.chunks] == [fits]


def test_rollback_recomputes_from_the_cut():
    f = Fixture(a={})
    r = f.req("a", 10, prompt_open=True)
    f.step()
    pages = list(r.block_table)
    f.sched.rollback(r, 6)  # page 1 (tokens 4..7) is registered: recomputed from 4
    assert r.num_computed == 4 and r.block_table == pages[:1]
    del r.prompt_ids[6:]
    r.prompt_ids += [50, 51]
    r.prompt_open = False
    plan = f.step()
    assert [(c.num_tokens, c.sample) for c in plan.chunks] == [(4, True)] and r.num_computed == 8
    f.sched.pool.check()


def test_heads_come_and_go_with_their_requests():
    f = Fixture(a={"quota_pages": 8})
    with pytest.raises(RequestError, match="head 'ghost'"):
        f.sched.add(Request(99, "ghost", "m", [1], SamplingParams(), 0.0))
    with pytest.raises(ConfigError, match="not registered"):
        f.sched.add_head("x", "unknown-model")
    with pytest.raises(ConfigError, match="weight"):
        f.sched.add_head("x", "m", weight=0)
    running, waiting = f.req("a", 9), f.req("a", 3, add=False)
    f.step()
    f.sched.add(waiting)
    with pytest.raises(ConfigError, match="still has requests"):
        f.sched.add_head("a", "m")
    assert f.sched.pool.held_by("a") == 3
    left = f.sched.remove_head("a")
    assert left == [running, waiting] and running.block_table == [] and f.sched.pool.num_free == 64
    assert f.sched.pool.quota("a") is None and f.sched.requests() == [] and f.sched.remove_head("a") == []
    f.sched.remove(running)  # idempotent, also once its head is gone
    f.sched.pool.check()


def test_remove_takes_a_request_out_and_frees_its_pages():
    f = Fixture(a={})
    r, w = f.req("a", 9), f.req("a", 2)
    f.sched.heads["a"].max_concurrent = 1
    f.step()
    assert r.status == Status.RUNNING and w.status == Status.WAITING
    f.sched.remove(r)
    f.sched.remove(w)
    f.sched.remove(r)
    assert f.sched.requests() == [] and f.sched.pool.num_free == 64 and r.block_table == []
    assert f.step().chunks == []
