"""Remote heads (`model="openai:http://HOST:PORT/v1"`) against a second MultiHead server process on loopback: a head
answers what the engine answers, with its pieces in the frames at their arrival times and no local pages; a team
of one remote and two local heads equals running its steps by hand (greedy); refusal, timeouts and a death
mid-stream fail that step with a clear error and free the local heads' pages; cancel; `%%head`; team files."""

import time

import openai
import pytest
from IPython.core.error import UsageError
from IPython.core.interactiveshell import InteractiveShell

import multihead_nb as mh
from helpers import make_ws
from multihead_nb.errors import ConfigError, RequestError, TeamError
from server_process import ServerProcess

SYSTEM = "You plan."
STEPS = {"planner": "Plan {task}", "coder": "Write code for this plan:\n{planner}",
         "reviewer": "Check the code\n{coder}\nagainst the plan\n{planner}"}


@pytest.fixture(scope="module")
def model(tiny_ckpt):
    return str(tiny_ckpt("llama"))


@pytest.fixture(scope="module")
def remote(model):
    server = ServerProcess("--model", f"planner={model}", "--api-key", "k")
    yield server
    server.stop()


def add_remote(ws, url, **kw):
    kw.setdefault("max_tokens", 24)
    return ws.add_head("planner", f"openai:{url}", SYSTEM, remote_model="planner", api_key="k", ignore_eos=True,
                       replace=True, **kw)


def team_ws(model, url, **kw):
    ws = make_ws(**kw)
    add_remote(ws, url)
    ws.add_head("coder", model, max_tokens=8, ignore_eos=True)
    ws.add_head("reviewer", model, max_tokens=8, ignore_eos=True)
    return ws


def by_hand(url, prompt, max_tokens=24):
    """The remote step run by hand: the engine's own answer to the messages the head sends."""
    r = openai.OpenAI(base_url=url, api_key="k", max_retries=0).chat.completions.create(
        model="planner", messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": prompt}],
        max_tokens=max_tokens, temperature=0, extra_body={"ignore_eos": True})
    return r.choices[0].message.content


def test_a_remote_head_answers_what_the_engine_answers(model, remote):
    ws = make_ws()
    free = ws.pool.num_free
    head = add_remote(ws, remote.url)
    assert head.model == f"openai:{remote.url}#planner?key=" + __import__("hashlib").sha256(b"k").hexdigest()[:8]
    assert ws.pool.num_free == free  # no weights, no pages
    c = ws.generate("planner", "Plan a picnic.")
    assert c.text == by_hand(remote.url, "Plan a picnic.") and c.finish_reason == "length"
    tok = c.tokens
    assert len(tok) == len(c.token_ids) >= 2 and "".join(tok.text) == c.text
    assert tok.t.is_monotonic_increasing and (tok.batch_size == 0).all()
    assert not (ws.pages().owner == "planner").any() and ws.pool.num_free == free
    stats = ws.stats()["models"][head.model]
    assert stats["backend"] == "remote" and stats["weight_pages"] == 0 and "remote" in stats["runs_on"]
    assert ws.generate("planner", "Plan a picnic.", max_tokens=3).text == by_hand(remote.url, "Plan a picnic.", 3)
    ws.close()


def test_adding_a_remote_head_checks_the_engine(model, remote):
    ws = make_ws()
    with pytest.raises(ConfigError, match=r"refused the API key \(401\)"):
        ws.add_head("p", f"openai:{remote.url}", remote_model="planner", api_key="wrong")
    with pytest.raises(ConfigError, match=r"does not serve remote_model 'nope' \(it serves: planner\)"):
        ws.add_head("p", f"openai:{remote.url}", remote_model="nope", api_key="k")
    with pytest.raises(ConfigError, match="remote_model= is not an option of the 'native' backend"):
        ws.add_head("p", model, remote_model="planner")
    with pytest.raises(ConfigError, match="timeout must be a positive number"):
        ws.add_head("p", f"openai:{remote.url}", api_key="k", timeout=0)
    ws.add_head("p", f"openai:{remote.url}", api_key="k")  # one model served: remote_model may be left out
    assert ws.heads["p"].model.startswith(f"openai:{remote.url}?key=")
    ws.add_head("q", f"openai:{remote.url}#planner?timeout=5", api_key="k")  # a key is a reference too
    assert ws.heads["q"].model.startswith(f"openai:{remote.url}#planner?timeout=5&key=")
    ws.pool.check()
    ws.close()


def test_a_team_of_one_remote_and_two_local_heads_equals_its_steps_by_hand(model, remote):
    ws = team_ws(model, remote.url)
    free = ws.pool.num_free
    team = ws.team(STEPS)
    run = team.run(task="a picnic")
    assert run.outputs["planner"] == by_hand(remote.url, "Plan a picnic")
    for head in ("coder", "reviewer"):  # the streamed prompts are what waiting would have built
        assert run.prompt_ids(head) == run.reference_prompt_ids(head)
    steps = team.sequential(task="a picnic")  # every step on its own, one after the other
    assert {i.head: c.text for i, c in steps.items()} == run.outputs
    tl = run.timeline().set_index("head")
    assert tl.loc["coder", "start"] < tl.loc["planner", "end"]  # the coder's prompt grew while the plan arrived
    tok = run.tokens
    assert set(tok["head"]) == {"planner", "coder", "reviewer"} and tok[tok["head"] == "planner"].t.nunique() > 1
    assert ws.pool.num_free == free
    ws.close()


def test_a_remote_that_goes_silent_fails_its_step_and_frees_local_pages(model, remote):
    ws = team_ws(model, remote.url, background=True)
    add_remote(ws, remote.url, max_tokens=400, timeout=1.0)
    free = ws.pool.num_free
    run = ws.team(STEPS).start(task="a long picnic")
    deadline = time.monotonic() + 30  # wait for the plan to stream and the engine thread to admit the coder
    while (len(run.outputs["planner"]) < 5 or ws.pool.num_free >= free) and time.monotonic() < deadline:
        time.sleep(0.01)
    remote.pause()
    try:
        assert ws.pool.num_free < free  # the coder's streamed prompt holds pages
        with pytest.raises(TeamError, match=r"step 'planner' .*failed: .*sent nothing for 1 s"):
            run.wait(timeout=60)
    finally:
        remote.resume()
    ws.sync()
    assert ws.pool.num_free == free and not ws.engine.live_requests()
    ws.pool.check()
    ws.close()


def test_cancel_a_remote_request(model, remote):
    ws = make_ws(background=True)
    add_remote(ws, remote.url, max_tokens=400)
    h = ws.submit("planner", "Plan a long picnic.")
    stream = h.stream()
    got = [next(stream) for _ in range(3)]
    assert ws.stats()["queues"]["planner"]["running"] == 1  # the dashboard's queues count it
    h.cancel()
    assert h.done and h.completion().finish_reason == "cancelled" and len(got) == 3
    assert len(h.completion().token_ids) < 400 and not ws.engine.live_requests()
    ws.close()


def test_a_remote_that_dies_or_refuses_fails_its_step_and_frees_local_pages(model):
    doomed = ServerProcess("--model", f"planner={model}", "--api-key", "k")
    ws = team_ws(model, doomed.url, background=True)
    add_remote(ws, doomed.url, max_tokens=400, retries=1)
    free = ws.pool.num_free
    run = ws.team(STEPS).start(task="a picnic")
    deadline = time.monotonic() + 30
    while len(run.outputs["planner"]) < 5 and time.monotonic() < deadline:
        time.sleep(0.01)
    doomed.kill()
    with pytest.raises(TeamError, match=r"step 'planner' .*failed: .*(broke off mid-answer|ended before)"):
        run.wait(timeout=60)
    ws.sync()
    assert ws.pool.num_free == free and not ws.engine.live_requests()
    # now nothing listens there: the step is refused after the bounded retries
    with pytest.raises(TeamError, match=r"step 'planner' .*failed: .*cannot connect after 2 tries"):
        ws.team(STEPS).run(task="again")
    with pytest.raises(RequestError, match="cannot connect"):
        ws.generate("planner", "hello")
    ws.sync()
    assert ws.pool.num_free == free
    ws.pool.check()
    assert ws.generate("coder", "still serving").token_ids  # the local heads are unharmed
    ws.close()


def test_head_magic_and_team_files(model, remote, tmp_path, capsys, monkeypatch):
    ip = InteractiveShell.instance()
    ip.run_line_magic("load_ext", "multihead_nb")
    try:
        ip.run_line_magic("mh", "pool 8MiB --page-bytes 8KiB --device cpu --dtype float32")
        ip.run_cell_magic("head", f"planner --model openai:{remote.url} --remote-model planner --api-key k "
                                  "--max-tokens 6 --timeout 30 --retries 1", SYSTEM)
        out = capsys.readouterr().out
        assert "head 'planner': remote: 'planner' at http://127.0.0.1:" in out and "no local weights" in out
        with pytest.raises(UsageError, match="401"):
            ip.run_cell_magic("head", f"other --model openai:{remote.url} --api-key nope", "You plan.")
        ws = mh.workspace()
        ws.add_head("coder", model, max_tokens=4)
        path = ws.team({"planner": "Plan {task}", "coder": "Code {planner}"}).save(tmp_path / "t.yaml")
        text = path.read_text()
        assert "remote_model: planner" in text and "timeout: 30" in text and "api_key" not in text
    finally:
        mh.workspace().close()
        ip.run_line_magic("unload_ext", "multihead_nb")
    ws2 = make_ws()
    with pytest.raises(mh.ConfigError, match=r"t.yaml: heads.planner: .*refused the API key \(401\)"):
        mh.load_team(path, ws2)  # the file holds no key
    assert not ws2.heads
    monkeypatch.setenv("MULTIHEAD_REMOTE_API_KEY", "k")  # where a loaded remote head's key comes from
    team = mh.load_team(path, ws2)
    assert ws2.heads["planner"].sampling.max_tokens == 6 and team.run(task="x").outputs["coder"] is not None
    ws2.close()
