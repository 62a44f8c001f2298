"""Teams: a graph of steps over a workspace's heads, run with streamed handoff between them.

`team.py` (the graph and its validation), `run.py` (one run: submitting, streaming upstream text into downstream
prompts, results and frames), `handoff.py` (what a downstream prompt looks like token by token),
`json_output.py` (JSON steps), `step.py` (one step), `files.py`, `file_schema.py` and `load.py` (team files:
YAML/JSON, validated, saved and loaded), `workflows.py` (the three classic pipelines, shipped as team files in
`builtin/`). Uses the workspace's public API only.
"""

from .files import TeamFileError, TeamSpec, read_team_file, write_team_file
from .load import load_team, read_team
from .step import Step
from .team import Team
from .workflows import CODE, CREATIVE, RESEARCH, WORKFLOWS, Workflow

__all__ = ["CODE", "CREATIVE", "RESEARCH", "Step", "Team", "TeamFileError", "TeamSpec", "WORKFLOWS", "Workflow",
           "load_team", "read_team", "read_team_file", "write_team_file"]
