"""Team files: a team saved to YAML/JSON and loaded back gives the same heads, steps and greedy outputs; the built-in
workflows are such files; every malformed file is a clear error naming the file and the field, and a failed load
leaves the workspace as it was; `%%team --save` and `%mh load`."""

import json
import shutil

import pytest
from IPython.core.error import UsageError
from IPython.core.interactiveshell import InteractiveShell

import multihead_nb as mh
from helpers import make_ws
from multihead_nb.team import CODE, CREATIVE, RESEARCH, WORKFLOWS, Step, TeamFileError, read_team
from multihead_nb.team.files import head_definition


@pytest.fixture(scope="module")
def model(tiny_ckpt):
    return str(tiny_ckpt("llama"))


def define(ws, model):
    ws.add_head("coder", model, system="You write Python.\nOnly code.", max_tokens=12, ignore_eos=True,
                stop=("END", "STOP"), quota="50%", weight=2.0, max_concurrent=2)
    ws.add_head("reviewer", model, system="You review code.", max_tokens=10, temperature=0.8, top_p=0.9, top_k=5,
                seed=7)
    ws.add_head("writer", model, max_tokens=6, ignore_eos=True)
    return ws.team({
        "coder": "Write {task} in {style} style",
        "reviewer": Step("Rate this as JSON: {coder}", schema={"score": int, "notes": str},
                         options={"max_tokens": 8}),
        "writer": Step("Improve {coder} given {reviewer} and your draft {writer}", rounds=2, sees=("reviewer",)),
    })


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_save_and_load_round_trip(model, tmp_path, suffix):
    ws = make_ws()
    team = define(ws, model)
    path = team.save(tmp_path / f"my-team{suffix}", variables={"task": "a sort", "style": "terse"})
    ws2 = make_ws()
    loaded = mh.load_team(path, ws2)
    for name in ("coder", "reviewer", "writer"):
        assert head_definition(ws2.heads[name]) == head_definition(ws.heads[name])
        assert ws2.heads[name].sampling == ws.heads[name].sampling and ws2.heads[name].system == ws.heads[name].system
    assert loaded.steps == team.steps and loaded.name == "my-team"
    assert loaded.defaults == {"task": "a sort", "style": "terse"} and loaded.variables == ["task", "style"]
    assert ws2.scheduler.heads["coder"].quota_pages == ws.scheduler.heads["coder"].quota_pages
    # greedy: the loaded team, run with its saved defaults, writes what the original writes (the reviewer samples
    # with its seed, the same in both)
    steps = {"coder": "Write {task} in {style} style", "writer": "Improve {coder}"}
    a = ws.team(steps).run(task="a sort", style="terse").outputs
    b = ws2.team(steps).run(task="a sort", style="terse").outputs
    assert a == b and a["coder"]
    # a file saved from the loaded team is the same file
    again = loaded.save(tmp_path / f"again{suffix}")
    assert again.read_text().replace("again", "my-team") == path.read_text()
    ws.close(), ws2.close()


def test_the_builtin_workflows_are_team_files(model):
    assert sorted(WORKFLOWS) == ["code", "creative", "research"]
    assert CODE.path.suffix == ".yaml" and CODE.path.exists()
    spec = read_team("creative")  # a built-in by name
    assert spec.steps["writer"].rounds == 2 and spec.steps["writer"].sees == ("editor",)
    assert CREATIVE.systems["editor"].startswith("You are a demanding editor")
    assert RESEARCH.variables == read_team("research").variables and "question" in RESEARCH.variables
    ws = make_ws()
    team = mh.load_team("code", ws, model=model, max_tokens=6, ignore_eos=True)
    assert team.name == "code" and team.output_head == "reviewer" and team.input_variable == "task"
    assert set(ws.heads) == {"coder", "reviewer", "documenter"}
    assert ws.heads["coder"].system == CODE.systems["coder"] and ws.heads["coder"].sampling.max_tokens == 6
    run = team.run()  # the file's example variable is the default
    assert all(run.outputs.values())
    # setup with a prefix renames the heads and the templates' references to them
    t2 = CREATIVE.setup(ws, model, prefix="c_", max_tokens=4)
    assert set(t2.steps) == {"c_ideator", "c_writer", "c_editor"} and t2.steps["c_writer"].sees == ("c_editor",)
    assert "{c_ideator}" in t2.steps["c_writer"].template and t2.output_head == "c_writer"
    ws.close()


GOOD = {
    "multihead_team": 1, "name": "t",
    "heads": {"coder": {"model": "MODEL", "max_tokens": 4}, "reviewer": {"model": "MODEL"}},
    "steps": {"coder": "Write {task}", "reviewer": "Review {coder}"},
    "variables": {"task": "a sort"},
}


def bad(**changes):
    doc = json.loads(json.dumps(GOOD))
    for path, value in changes.items():
        *parents, last = path.split("__")
        d = doc
        for p in parents:
            d = d[p]
        if value is None:
            del d[last]
        else:
            d[last] = value
    return doc


@pytest.mark.parametrize("doc, field, words", [
    (bad(colour="red"), "colour", "unknown key"),
    (bad(heads__coder__temprature=0.5), "heads.coder.temprature", "unknown key"),
    (bad(heads__coder__temperature="hot"), "heads.coder.temperature", "must be a number"),
    (bad(heads__coder__max_tokens=0), "heads.coder.max_tokens", ">= 1"),
    (bad(heads__coder__stop=[""]), "heads.coder.stop", "non-empty"),
    (bad(heads__reviewer__model=None), "heads.reviewer.model", "missing"),
    (bad(heads__bad_name={"model": "MODEL"}, steps__bad_name="x"), None, None),  # fine: a valid identifier
    (bad(**{"heads__bad-name": {"model": "MODEL"}}), "heads.bad-name", "identifier"),
    (bad(steps__ghost="hello"), "steps.ghost", "no head 'ghost'"),
    (bad(steps__reviewer={"template": "x {coder}", "roundz": 2}), "steps.reviewer.roundz", "unknown key"),
    (bad(steps__reviewer={"template": "x {coder}", "rounds": 0}), "steps.reviewer", "rounds must be"),
    (bad(steps__reviewer={"template": "x {coder}", "schema": {"s": "number"}}), "steps.reviewer.schema.s", "type"),
    (bad(steps__reviewer={"template": "x {coder}", "options": {"temperature": -1}}),
     "steps.reviewer.options.temperature", ">= 0"),
    (bad(steps__reviewer=None), "heads.reviewer", "has no step"),
    (bad(steps__coder="fix {reviewer}"), None, "cycle"),
    (bad(variables__nope="x"), None, "'nope', which is not a variable"),
    (bad(output="ghost"), None, "output 'ghost' is not a step"),
    (bad(multihead_team=2), "multihead_team", "version 1"),
    (bad(name="has space"), "name", "letters, digits"),
    (bad(heads=[]), "heads", "non-empty mapping"),
    (bad(steps=None), "steps", "missing"),
])
def test_bad_team_files_name_the_file_and_field(model, tmp_path, doc, field, words):
    path = tmp_path / "team.json"
    path.write_text(json.dumps(doc).replace("MODEL", model))
    if words is None:
        assert read_team(path).heads["bad_name"]
        return
    with pytest.raises(TeamFileError) as e:
        read_team(path)
    msg = str(e.value)
    assert msg.startswith(f"{path}: ") and words in msg, msg
    if field is not None:
        assert f": {field}: " in msg, msg
    assert "\n" not in msg


def test_unreadable_files(tmp_path):
    cases = {
        "t.yaml": ("heads:\n  coder: {model: x\nsteps: [", "line 3", "not valid YAML"),
        "t.json": ('{"heads": {', "line 1", "not valid JSON"),
        "t.txt": ("heads: {}", ".txt", "ends in .yaml, .yml or .json"),
        "list.yaml": ("- a\n- b\n", "list", "holds a mapping"),
    }
    for name, (text, where, words) in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(TeamFileError, match=words) as e:
            read_team(tmp_path / name)
        assert str(e.value).startswith(str(tmp_path / name)) and where in str(e.value)
    with pytest.raises(TeamFileError, match="no such team file.*built-in team: code, creative, research"):
        read_team(tmp_path / "missing.yaml")


def test_a_failed_load_leaves_the_workspace_as_it_was(model, tmp_path):
    ws = make_ws()
    ws.add_head("coder", model, system="Old coder.", max_tokens=3)
    free, before = ws.pool.num_free, dict(ws.heads)
    doc = bad(heads__reviewer__model=str(tmp_path / "no-such-model"))
    doc["heads"]["coder"]["model"] = model
    path = tmp_path / "t.yaml"
    import yaml

    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(TeamFileError, match=rf"^{path}: heads.reviewer: "):
        mh.load_team(path, ws)  # coder was replaced, then reviewer failed: the old coder is back
    assert set(ws.heads) == {"coder"} and ws.heads["coder"].system == "Old coder."
    assert ws.heads["coder"].sampling.max_tokens == 3 and ws.pool.num_free == free
    with pytest.raises(TeamFileError, match="heads.coder: a head of that name exists"):
        mh.load_team(path, ws, replace=False)
    assert ws.heads == before
    ws.pool.check()
    ws.close()


def test_relative_model_folders(model, tmp_path):
    shutil.copytree(model, tmp_path / "models" / "tiny")
    ws = make_ws()
    ws.add_head("solo", str(tmp_path / "models" / "tiny"), max_tokens=4)
    path = ws.team({"solo": "Say {what}"}).save(tmp_path / "solo.yaml")
    assert "model: ./models/tiny" in path.read_text()
    moved = tmp_path / "elsewhere"
    shutil.copytree(tmp_path, moved, ignore=shutil.ignore_patterns("elsewhere"))
    ws2 = make_ws()
    team = mh.load_team(moved / "solo.yaml", ws2)
    assert ws2.heads["solo"].model == str((moved / "models" / "tiny").resolve())
    assert team.run(what="hi").outputs["solo"] is not None
    ws.close(), ws2.close()


# ---- the magics -----------------------------------------------------------------------------------------
@pytest.fixture
def shell(model):
    ip = InteractiveShell.instance()
    ip.run_line_magic("load_ext", "multihead_nb")
    ip.run_line_magic("mh", "pool 8MiB --page-bytes 8KiB --device cpu --dtype float32")
    yield ip
    mh.workspace().close()
    ip.run_line_magic("unload_ext", "multihead_nb")


def test_team_save_and_mh_load(shell, model, tmp_path, capsys):
    shell.run_cell_magic("head", f"coder --model {model} --max-tokens 6 --temperature 0", "You write Python.")
    shell.run_cell_magic("head", f"reviewer --model {model} --max-tokens 5 --quota 25%", "You review code.")
    path = tmp_path / "pair.yaml"
    assert shell.run_cell_magic("team", f"--save {path} --no-run --var task=sorting",
                                "coder: Write {task}\nreviewer: Review {coder}") is None
    assert f"saved team 'pair' (coder, reviewer) to {path}" in capsys.readouterr().out
    shell.run_line_magic("mh", "reset")
    team = shell.run_line_magic("mh", f"load {path} -o t")
    out = capsys.readouterr().out
    assert "team 'pair': heads coder, reviewer" in out and "defaults task='sorting'" in out
    assert shell.user_ns["t"] is team and mh.workspace().heads["reviewer"].quota == "25%"
    assert team.run().outputs["coder"]
    shell.run_line_magic("mh", f"load code --model {model} --prefix w_")
    assert {"w_coder", "w_reviewer", "w_documenter"} <= set(mh.workspace().heads)
    for line, words in ((f"load {tmp_path / 'nope.yaml'}", "no such team file"), ("load", "arguments"),
                        (f"load {path} -o 1x", "variable name")):
        with pytest.raises(UsageError, match=words):
            shell.run_line_magic("mh", line)
    with pytest.raises(UsageError, match="ends in .yaml"):
        shell.run_cell_magic("team", f"--save {tmp_path / 'x.txt'} --no-run", "coder: hi")
