"""The three classic workflows (the MultiHead article's benchmark) as ready templates: code, research and creative.

Owns: the heads' system prompts and the step templates of each workflow, and `setup(ws, name, model)` which adds
the heads and returns the team. Knows nothing of how teams run.
"""

from __future__ import annotations

from dataclasses import dataclass

from .team import Step


@dataclass(frozen=True)
class Workflow:
    name: str
    systems: dict  # head -> system prompt
    steps: dict  # head -> template or Step
    variables: dict  # example run variables

    def setup(self, ws, model: str, *, prefix: str = "", replace: bool = True, **head_options):
        """Add this workflow's heads (named `prefix + head`) on `model` and return the team."""
        names = {h: prefix + h for h in self.systems}
        for head, system in self.systems.items():
            ws.add_head(names[head], model, system=system, replace=replace, **head_options)
        steps = {}
        for head, step in self.steps.items():
            s = step if isinstance(step, Step) else Step(step)
            template = s.template
            if prefix:
                for h in self.systems:
                    template = template.replace("{" + h + "}", "{" + names[h] + "}")
            steps[names[head]] = Step(template, rounds=s.rounds, sees=tuple(names[x] for x in s.sees),
                                      schema=s.schema, json=s.json, options=dict(s.options))
        return ws.team(steps)


CODE = Workflow(
    name="code",
    systems={
        "coder": "You are a senior Python developer. Answer with one complete, idiomatic, typed Python function "
        "in a code block, and nothing else.",
        "reviewer": "You are a meticulous code reviewer. List concrete bugs, edge cases and style problems in the "
        "code you are given, most important first, each with a one-line fix.",
        "documenter": "You are a technical writer. Write a concise docstring-style reference for the code you are "
        "given: what it does, its parameters, what it returns, and one usage example.",
    },
    steps={
        "coder": "Write a Python function that {task}",
        "reviewer": "Review this code:\n\n{coder}",
        "documenter": "Write the documentation for this code:\n\n{coder}",
    },
    variables={"task": "merges two sorted lists into one sorted list"},
)

RESEARCH = Workflow(
    name="research",
    systems={
        "researcher": "You are a careful researcher. Gather the key facts, definitions and open questions about "
        "the question you are given, as terse bullet-point notes.",
        "summarizer": "You are an editor. Turn research notes into a clear summary of at most five sentences for "
        "a general audience.",
        "critic": "You are a skeptical reviewer. Point out what the summary gets wrong, leaves out or overstates, "
        "and suggest one better sentence.",
    },
    steps={
        "researcher": "Question: {question}\n\nWrite your research notes.",
        "summarizer": "Summarize these research notes:\n\n{researcher}",
        "critic": "Critique this summary:\n\n{summarizer}",
    },
    variables={"question": "How does paged attention reduce memory waste when serving language models?"},
)

CREATIVE = Workflow(
    name="creative",
    systems={
        "ideator": "You are an imaginative brainstormer. Offer five short, distinct ideas as a numbered list.",
        "writer": "You are a fiction writer. Write vivid, tight prose. When given a critique of your previous "
        "draft, rewrite the draft to address it.",
        "editor": "You are a demanding editor. Give three specific, actionable notes on the draft you are given.",
    },
    steps={
        "ideator": "Ideas for a very short story about {topic}.",
        "writer": Step(
            "Write a very short story using the best of these ideas:\n\n{ideator}\n\n"
            "Your previous draft (empty in the first round):\n{writer}\n\n"
            "Editor's notes on it (empty in the first round):\n{editor}",
            rounds=2,
            sees=("editor",),
        ),
        "editor": "Give your notes on this draft:\n\n{writer}",
    },
    variables={"topic": "a lighthouse keeper who collects lost messages"},
)

WORKFLOWS = {w.name: w for w in (CODE, RESEARCH, CREATIVE)}
