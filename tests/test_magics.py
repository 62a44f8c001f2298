"""The magics through a real IPython shell: every magic, `%config` defaults, and every bad input as a one-line
UsageError that leaves the workspace as it was."""

import _thread

import pandas as pd
import pytest
from IPython.core.error import UsageError
from IPython.core.interactiveshell import InteractiveShell

import multihead_nb as mh
from multihead_nb.errors import ConfigError
from multihead_nb.notebook.magics import parsers
from multihead_nb.notebook.magics.magic import MultiHeadMagics

POOL = "8MiB --page-bytes 8KiB --device cpu --dtype float32"


@pytest.fixture(scope="module")
def model(tiny_ckpt):
    return str(tiny_ckpt("llama"))


@pytest.fixture
def shell(model):
    ip = InteractiveShell.instance()
    ip.run_line_magic("load_ext", "multihead_nb")
    ip.run_line_magic("mh", f"pool {POOL}")
    yield ip
    ip.user_ns.pop("task", None)
    mh.workspace().close()
    ip.run_line_magic("unload_ext", "multihead_nb")
    ip.config.pop("MultiHeadMagics", None)  # %config defaults live in the shell's config


def two_heads(ip, model):
    ip.run_cell_magic("head", f"coder --model {model} --max-tokens 8", "You write Python.")
    ip.run_cell_magic("head", f"reviewer --model {model} --max-tokens 8 --temperature 0.7 --seed 3 --stop END "
                              "--stop STOP --quota 25% --weight 2 --max-concurrent 1", "You review code.")


# ---- the magics ------------------------------------------------------------------------------------------
def test_head_defines_and_summarizes(shell, model, capsys):
    two_heads(shell, model)
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 2 and out[0].startswith("head 'coder'")
    assert "tokens/page" in out[0] and "weights" in out[0] and "float32" in out[0] and "quota none" in out[0]
    ws = mh.workspace()
    r = ws.heads["reviewer"]
    assert r.system == "You review code." and r.sampling.stop == ("END", "STOP") and r.sampling.seed == 3
    assert r.sampling.temperature == 0.7 and r.weight == 2 and r.max_concurrent == 1 and r.quota == "25%"
    shell.run_cell_magic("head", f"coder --model {model} --max-tokens 4", "Now you write Rust.")  # redefine
    assert ws.heads["coder"].system == "Now you write Rust." and ws.heads["coder"].sampling.max_tokens == 4
    assert len(ws.models) == 1  # both heads share one loaded model


def test_team_with_vars_namespace_and_output(shell, model, capsys):
    two_heads(shell, model)
    shell.user_ns["task"] = "reverse a list"
    run = shell.run_cell_magic("team", "-o r1 --var style=terse", """
# a comment, then a step whose prompt continues on indented lines
coder: Write a function that {task}.
    Be {style}.

reviewer: Review this:
    {coder}
""")
    assert shell.user_ns["r1"] is run and run.done and run.error is None
    assert set(run.outputs) == {"coder", "reviewer"} and all(run.outputs.values())
    assert run.team.steps["coder"].template == "Write a function that {task}.\nBe {style}."
    assert run.variables == {"task": "reverse a list", "style": "terse"}
    assert "--- coder ---" in capsys.readouterr().out  # no widgets outside a kernel: outputs printed at the end
    tl = run.timeline()
    assert list(tl["head"]) == ["coder", "reviewer"]


def test_mh_subcommands(shell, model, capsys):
    two_heads(shell, model)
    ws = mh.workspace()
    heads = shell.run_line_magic("mh", "heads")
    assert list(heads["head"]) == ["coder", "reviewer"] and heads.loc[1, "max_concurrent"] == 1
    pd.testing.assert_frame_equal(shell.run_line_magic("mh", "pages"), ws.pages())
    capsys.readouterr()
    shell.run_line_magic("mh", "run coder write a sort  function")
    assert len(ws.tokens()) == 8 and capsys.readouterr().out.endswith("\n")
    shell.run_line_magic("mh", "status")
    out = capsys.readouterr().out
    assert "1024 pages" in out and "head coder" in out and "8 tokens" in out
    (m,) = ws.stats()["models"].values()
    assert ("runs on fused CPU kernel" if m["cpu_kernel"] else "runs on PyTorch (") in out
    d = shell.run_line_magic("mh", "dashboard")
    assert d.live is False and set(d.figures) >= {"page_map", "queues", "timeline"}  # no kernel: static figures
    shell.run_line_magic("mh", "reset")
    assert mh.workspace() is not ws and ws.closed and not mh.workspace().heads
    assert mh.workspace().pool.num_pages == 1024  # reset keeps the pool options


def test_pool_recreates_the_default_workspace(shell):
    old = mh.workspace()
    shell.run_line_magic("mh", "pool 4MiB --page-bytes 16KiB")
    ws = mh.workspace()
    assert old.closed and ws.pool.num_pages == 256 and ws.page_bytes == 16384 and str(ws.device) == "cpu"


def test_pool_picks_the_cpu_kernel_build(shell, model):
    """`%mh pool ... --cpu-kernel K` (and `%config MultiHeadMagics.cpu_kernel`): the default workspace's kernel switch,
    a build named to compare builds from a notebook; a word it does not know is a one-line error, nothing changed."""
    shell.run_line_magic("mh", "pool 8MiB --page-bytes 8KiB --device cpu --dtype bfloat16 --cpu-kernel scalar")
    ws = mh.workspace()
    assert ws.cpu_kernel == "scalar"
    shell.run_cell_magic("head", f"coder --model {model} --max-tokens 3", "You write Python.")
    assert "fused CPU kernel scalar" in ws.stats()["models"][next(iter(ws.stats()["models"]))]["runs_on"]
    shell.run_line_magic("mh", "reset")  # the magic's options, --cpu-kernel included, carry over
    assert mh.workspace() is not ws and mh.workspace().cpu_kernel == "scalar"
    with pytest.raises(UsageError, match="--cpu-kernel 'sse2': expected one of auto, on, off, avx512, avx2, neon"):
        shell.run_line_magic("mh", "pool 8MiB --cpu-kernel sse2")
    assert mh.workspace().cpu_kernel == "scalar"
    shell.run_line_magic("config", 'MultiHeadMagics.cpu_kernel = "off"')
    shell.run_line_magic("mh", "reset")
    assert mh.workspace().cpu_kernel is False


def test_config_defaults(shell, model):
    shell.run_line_magic("config", f"MultiHeadMagics.default_model = {model!r}")
    shell.run_line_magic("config", "MultiHeadMagics.max_tokens = 5")
    shell.run_cell_magic("head", "writer", "  You write.\n")
    h = mh.workspace().heads["writer"]
    assert h.sampling.max_tokens == 5 and h.system == "You write."
    magics = next(c for c in shell.configurables if isinstance(c, MultiHeadMagics))
    assert magics.default_model == model


def test_keyboard_interrupt_cancels_the_team_cleanly(shell, model, capsys):
    shell.run_cell_magic("head", f"coder --model {model} --max-tokens 200", "You count.")
    ws = mh.workspace()
    free = ws.pool.num_free
    fired = []

    def interrupt(msg):
        if msg.kind == "tokens" and not fired:
            fired.append(msg)
            _thread.interrupt_main()

    sub = ws.bus.subscribe("coder", callback=interrupt)
    shell.user_ns["n"] = "slowly"
    try:
        run = shell.run_cell_magic("team", "-o cancelled", "coder: count to a thousand, {n}")
    finally:
        sub.close()
        shell.user_ns.pop("n", None)
    assert fired and run.done and str(run.error) == "the run was cancelled"
    assert len(run.tokens) < 200 and ws.pool.num_free == free
    assert "cancelled" in capsys.readouterr().err


# ---- bad input -----------------------------------------------------------------------------------------
BAD = [
    ("cell", "head", "coder", "no model given"),
    ("cell", "head", "coder --model {model} --frobnicate 3", "sys"),
    ("cell", "head", "coder --model {model} --temperature warm", "sys"),
    ("cell", "head", "coder --model {model} --temperature -1", "sys"),
    ("cell", "head", "coder --model {model} --top-p 2", "sys"),
    ("cell", "head", "1coder --model {model}", "sys"),
    ("cell", "head", "coder --model /nonexistent/model", "sys"),
    ("cell", "head", "coder --model {model} --quota 150%", "sys"),
    ("cell", "head", "coder --model {model} --quota lots", "sys"),
    ("cell", "head", "coder --model {model} --backend tpu", "sys"),
    ("cell", "head", "coder --model {model} --backend exl2", "sys"),  # no CUDA / exllamav2 here: named, nothing changed
    ("cell", "head", "newhead --model {model} --backend exl2 --region 10%", "sys"),
    ("cell", "head", "newhead --model {model} --kv-cache int8", "sys"),  # float32 pool: the PyTorch path, named
    ("cell", "head", "newhead --model {model} --kv-cache fp8", "sys"),
    ("cell", "head", "newhead --model {model} --activations int4", "sys"),
    ("cell", "team", "", "this line has no colon"),
    ("cell", "team", "", "  indented first line"),
    ("cell", "team", "", "ghost: {task}"),
    ("cell", "team", "", "coder: {task}"),
    ("cell", "team", "--var task=x", "coder: {task}\ncoder: again"),
    ("cell", "team", "--var =x", "coder: {task}"),
    ("cell", "team", "--var task=x --var other=y", "coder: {task}"),
    ("cell", "team", "-o 1x --var task=x", "coder: {task}"),
    ("cell", "team", "", "coder: {reviewer}\nreviewer: {coder}"),
    ("cell", "team", "", "# only a comment\n\n"),
    ("cell", "team", "", "coder: {task"),
    ("cell", "team", "--bogus", "coder: hi"),
    ("line", "mh", "frobnicate", None),
    ("line", "mh", "status now", None),
    ("line", "mh", "pages 3", None),
    ("line", "mh", "pool", None),
    ("line", "mh", "pool lots", None),
    ("line", "mh", "pool 8MiB --device tpu", None),
    ("line", "mh", "pool 8MiB --page-bytes zero", None),
    ("line", "mh", "pool 8MiB --dtype int8", None),
    ("line", "mh", "pool 4KiB --page-bytes 8KiB", None),
    ("line", "mh", "pool 4MiB --colour red", None),
    ("line", "mh", "run ghost hello", None),
    ("line", "mh", "run coder", None),
    ("line", "mh", "dashboard --interval 0", None),
    ("line", "mh", "reset please", None),
]


def snapshot(ws):
    return (ws.pool.num_pages, ws.pool.num_free, {n: (h.system, h.sampling, h.quota) for n, h in ws.heads.items()},
            len(ws.tokens()), ws.closed)


@pytest.mark.parametrize("kind,name,line,cell", BAD, ids=[f"{b[1]} {b[2]}|{b[3]}"[:60] for b in BAD])
def test_bad_input_is_a_one_line_usage_error(shell, model, kind, name, line, cell):
    shell.run_cell_magic("head", f"coder --model {model} --max-tokens 4", "You write Python.")
    shell.run_cell_magic("head", f"reviewer --model {model} --max-tokens 4", "You review.")
    ws = mh.workspace()
    before = snapshot(ws)
    line = line.format(model=model)
    with pytest.raises(UsageError) as e:
        if kind == "cell":
            shell.run_cell_magic(name, line, cell)
        else:
            shell.run_line_magic(name, line)
    msg = str(e.value)
    assert "cell body is empty" not in msg
    assert msg and "\n" not in msg and "Traceback" not in msg, msg
    assert e.value.__cause__ is None or e.value.__suppress_context__
    assert mh.workspace() is ws and snapshot(ws) == before


def test_run_cell_shows_usage_error_without_traceback(shell, model, capsys):
    result = shell.run_cell("%%team\nghost: hello\n")
    err = capsys.readouterr().err
    assert isinstance(result.error_in_exec, UsageError)
    assert "UsageError" in err and "ghost" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


# ---- parsers (pure) ------------------------------------------------------------------------------------
def test_parse_team_and_vars():
    body = "a: one {x}\n  two\n\n# c\nb:three {a}\n"
    assert parsers.parse_team(body) == {"a": "one {x}\ntwo", "b": "three {a}"}
    assert parsers.parse_vars(["k=v=w", "n= 3"]) == {"k": "v=w", "n": " 3"}
    with pytest.raises(ConfigError, match="line 1"):
        parsers.parse_team("a - b")
    with pytest.raises(ConfigError, match="empty prompt"):
        parsers.parse_team("a:\nb: x")
    assert parsers.parse_size_arg("8KiB", "x") == 8192
    with pytest.raises(ConfigError, match="--page-bytes"):
        parsers.parse_size_arg("8 parsecs", "--page-bytes")


@pytest.mark.parametrize("options", ["8MiB --page-bytes 1000", "1TiB --device cpu"])
def test_a_failed_pool_change_keeps_the_old_workspace_and_its_requests(shell, model, options):
    two_heads(shell, model)
    ws = mh.workspace()
    running = ws.submit("coder", [5, 6, 7], max_tokens=6, ignore_eos=True)
    with pytest.raises(UsageError):
        shell.run_line_magic("mh", f"pool {options}")
    assert mh.workspace() is ws and not ws.closed and set(ws.heads) == {"coder", "reviewer"}
    assert len(running.result(timeout=30).token_ids) == 6


def test_a_bad_configured_pool_is_an_error_not_a_silent_default(shell, model):
    mh.workspace().close()
    shell.run_line_magic("config", 'MultiHeadMagics.pool = "abc"')
    with pytest.raises(UsageError, match="pool must be a size"):
        shell.run_cell_magic("head", f"coder --model {model}", "You write Python.")
    from multihead_nb.workspace import default

    assert default.current() is None


def test_a_bug_inside_a_magic_is_not_disguised_as_a_usage_error(shell, model, monkeypatch):
    from multihead_nb.notebook.magics import commands

    monkeypatch.setattr(commands, "status", lambda ws: {}["missing"])  # a KeyError: a bug, not user input
    with pytest.raises(KeyError):
        shell.run_line_magic("mh", "status")
