"""Teams: a graph of steps over a workspace's heads, run with streamed handoff between them.

`team.py` (the graph and its validation), `run.py` (one run: submitting, streaming upstream text into downstream
prompts, results and frames), `handoff.py` (what a downstream prompt looks like token by token),
`json_output.py` (JSON steps), `workflows.py` (the three classic pipelines). Uses the workspace's public API only.
"""

from .team import Step, Team
from .workflows import CODE, CREATIVE, RESEARCH, WORKFLOWS, Workflow

__all__ = ["CODE", "CREATIVE", "RESEARCH", "Step", "Team", "WORKFLOWS", "Workflow"]
