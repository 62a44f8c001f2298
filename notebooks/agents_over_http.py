"""Notebook 05, agents over HTTP: the workspace served over the OpenAI protocol (the openai client, LangChain, a
team by name) and a remote head whose tokens come from another engine, watched on the dashboard."""

from __future__ import annotations

from cells import code, md, params

AGENTS_OVER_HTTP = [
    md("""
# Agents over HTTP

Agent frameworks (LangChain/LangGraph, CrewAI, AutoGen, LlamaIndex) talk to engines through the OpenAI
chat-completions protocol. `ws.serve()` serves this notebook's workspace that way, beside the engine the notebook
uses: every head (and every team) is a model, and HTTP requests are batched with the notebook's own. The other way
round, a **remote head** is a head whose tokens come from another engine over HTTP (vLLM, SGLang, llama-server,
Ollama, another MultiHead); it takes part in teams like any head."""),
    params(64),
    code("""
import multihead_nb as mh
%load_ext multihead_nb

ws = mh.reset_workspace(pool=POOL, page_bytes=PAGE_BYTES, device=DEVICE, dtype=DTYPE)
ws.add_head("coder", MODEL, system="You are a senior Python developer. Answer with one short function.",
            max_tokens=MAX_TOKENS)
review = mh.load_team("code", ws, model=MODEL, max_tokens=MAX_TOKENS)  # a built-in team file
server = ws.serve(port=0, teams=[review])  # port=0: any free port on 127.0.0.1
server"""),
    md("## The openai client\nEvery head and team is listed as a model; a chat completion streams like OpenAI's."),
    code("""
from openai import OpenAI

client = OpenAI(base_url=server.url, api_key="unused")
print([m.id for m in client.models.list().data])
reply = client.chat.completions.create(model="coder", messages=[{"role": "user", "content": "reverse a list"}],
                                       temperature=0)
print(reply.choices[0].message.content, "\\n", reply.usage)"""),
    code("""
stream = client.chat.completions.create(model="coder", temperature=0, stream=True,
                                        stream_options={"include_usage": True},
                                        messages=[{"role": "user", "content": "reverse a list"}])
for chunk in stream:
    if chunk.choices:
        print(chunk.choices[0].delta.content or "", end="", flush=True)
    elif chunk.usage:
        print("\\n", chunk.usage)"""),
    md("## LangChain\n`ChatOpenAI` pointed at the server: `invoke` and `stream` work as with any OpenAI engine."),
    code("""
from langchain_openai import ChatOpenAI

llm = ChatOpenAI(base_url=server.url, api_key="unused", model="coder", temperature=0)
print(llm.invoke("Write a function that counts vowels.").content)
for piece in llm.stream("Write a function that counts vowels."):
    print(piece.content, end="")"""),
    md("""
## A team by name
The team's name is a model: the user message fills its input variable (`task`), the whole team runs (coder, then
reviewer and documenter while the code is still being written) and the reviewer's answer streams back."""),
    code("""
reply = client.chat.completions.create(model="code", messages=[{"role": "user", "content": "merges two sorted lists"}])
print(reply.choices[0].message.content, "\\n", reply.usage)"""),
    md("""
## A remote head
Here the other engine is a second MultiHead workspace in this kernel, served on another port (on a real setup: a
large model on a GPU server, a vLLM or llama-server deployment). The remote head streams its plan over HTTP, and
the local coder's prompt grows while the plan arrives."""),
    code("""
other = mh.Workspace(pool=POOL, page_bytes=PAGE_BYTES, device=DEVICE, dtype=DTYPE)
other.add_head("planner", MODEL)
far = other.serve(port=0)

ws.add_head("planner", f"openai:{far.url}", system="You plan software in three short steps.",
            remote_model="planner", max_tokens=MAX_TOKENS, timeout=30)
%mh status"""),
    code("""
dash = ws.dashboard()
dash"""),
    code("""
run = ws.team({
    "planner": "Plan a small tool that {task}",
    "coder": "Write the code for this plan:\\n{planner}",
}).run(task="renames photos by their date")
for head, text in run.outputs.items():
    print(f"--- {head} ---\\n{text}\\n")"""),
    md("""
The remote head's tokens are rows of the frames like any head's, at the times they arrived (`batch_size` 0: no
local forward computed them); it holds no pages of the arena."""),
    code("""
run.timeline()"""),
    code("""
tok = run.tokens
tok[tok["head"] == "planner"][["head", "index", "text", "t", "dt", "batch_size"]].head()"""),
    code("""
print("pages held by the planner:", int((ws.pages().owner == "planner").sum()))
dash.stop()
server.stop(); far.stop(); other.close()"""),
]
