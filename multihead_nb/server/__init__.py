"""The OpenAI-compatible HTTP server (a floor beside the notebook's): a workspace's heads and teams served to agent
frameworks (the openai client, LangChain, CrewAI, AutoGen, LlamaIndex, ...).

`protocol.py` (request bodies checked, response and error shapes), `generations.py` (a head's request or a team's
run seen from the event loop), `responses.py` (JSON answers and server-sent events), `app.py` (the Starlette app,
`serve(ws, ...)` behind `Workspace.serve`), `running.py` (uvicorn on a thread), `cli.py` (`python -m multihead_nb
serve`). Uses the workspace's and teams' public API only.
"""
