"""Teams: a graph of steps, one per head, whose prompt templates name the heads whose output they need.

Owns: parsing templates (a placeholder naming a team head is that head's output, any other is a run variable),
validation before anything runs (unknown head, cycle, missing variable), refine loops (`rounds`), and the plan of
step *instances* (head, round) with the instance each reference reads. Knows nothing of pages or tensors; a run
is `TeamRun` (team_run.py).
"""

from __future__ import annotations

import string
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..errors import MultiHeadError, TeamError

if TYPE_CHECKING:
    from .run import TeamRun
    from ..workspace.workspace import Workspace

_TYPES = {"str": str, "int": int, "float": float, "bool": bool, "list": list, "dict": dict}


MAX_ROUNDS = 100  # a refine loop of more rounds is a mistake, and planning it would take seconds


@dataclass
class Step:
    """A head's part in a team.

    template: the user prompt, with `{head}` and `{variable}` placeholders.
    rounds: run this step N times; between rounds the heads in `sees` run on its latest output, and in round r a
        placeholder naming this head or a head in `sees` reads that head's output of round r-1 ("" in round 1).
    schema: the output must be a JSON object with these fields (field -> type or type name); `json=True` asks only
        for valid JSON.
    options: sampling overrides for this step (max_tokens, temperature, ...).
    """

    template: str
    rounds: int = 1
    sees: tuple[str, ...] = ()
    schema: dict | None = None
    json: bool = False
    options: dict = field(default_factory=dict)

    def __post_init__(self):
        if not isinstance(self.template, str):
            raise TeamError(f"a step's template must be a string, got {type(self.template).__name__}")
        if isinstance(self.rounds, bool) or not isinstance(self.rounds, int) or not 1 <= self.rounds <= MAX_ROUNDS:
            raise TeamError(f"rounds must be an integer from 1 to {MAX_ROUNDS}, got {self.rounds!r}")
        self.sees = (self.sees,) if isinstance(self.sees, str) else tuple(self.sees)
        if self.sees and self.rounds == 1:
            raise TeamError("`sees` only makes sense with rounds > 1")
        if self.schema is not None:
            if not isinstance(self.schema, dict):
                raise TeamError(f"a schema is a dict of field -> type, got {self.schema!r}")
            self.schema = {k: _TYPES.get(v, v) if isinstance(v, str) else v for k, v in self.schema.items()}
            for k, v in self.schema.items():
                if not isinstance(v, type):
                    raise TeamError(f"schema field {k!r} must map to a type (or str, int, ...), got {v!r}")
            self.json = True


def placeholders(template: str) -> list[str]:
    """Field names in a template, in order (`{{` and `}}` are literal braces)."""
    try:
        names = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as e:
        raise TeamError(f"malformed template {template!r}: {e}") from None
    for n in names:
        if not n.isidentifier():
            raise TeamError(f"placeholder {{{n}}} in {template!r} must be a plain name like {{task}}")
    return names


@dataclass(frozen=True)
class Instance:
    head: str
    round: int  # 1-based


class Team:
    """Steps (head -> template or Step) bound to a workspace; `run(**vars)` or `start(**vars)`."""

    def __init__(self, ws: "Workspace", steps: dict):
        if not isinstance(steps, dict) or not steps:
            raise TeamError("a team needs a dict of at least one step: {head: template}")
        self.ws = ws
        self.steps: dict[str, Step] = {}
        for head, step in steps.items():
            if head not in ws.heads:
                known = ", ".join(sorted(ws.heads)) or "none"
                raise TeamError(f"team step {head!r} names no head of this workspace (heads: {known})")
            self.steps[head] = step if isinstance(step, Step) else Step(step)
            try:
                ws.heads[head].sampling.replace(**self.steps[head].options)
            except MultiHeadError as e:
                raise TeamError(f"step {head!r}: {e}") from None
        self.refs: dict[str, list[str]] = {}
        self.variables: list[str] = []
        for head, step in self.steps.items():
            names = placeholders(step.template)
            self.refs[head] = [n for n in names if n in self.steps]
            for n in names:
                if n not in self.steps:
                    if n in ws.heads:
                        raise TeamError(f"step {head!r} reads {{{n}}}, a head that is not a step of this team")
                    if n not in self.variables:
                        self.variables.append(n)
            for s in step.sees:
                if s not in self.steps:
                    raise TeamError(f"step {head!r} sees {s!r}, which is not a step of this team")
        self.instances, self.sources = self._plan()
        self.order = self._toposort()

    # ---- the instance graph --------------------------------------------------------------------------------
    def _plan(self):
        looped = {s: h for h, st in self.steps.items() for s in st.sees}  # critic -> the step it serves
        instances: list[Instance] = []
        for head, step in self.steps.items():
            if head in looped:
                n = self.steps[looped[head]].rounds - 1
            else:
                n = step.rounds
            instances += [Instance(head, r) for r in range(1, n + 1)]
        final = {}
        for inst in instances:
            final[inst.head] = max(final.get(inst.head, 0), inst.round)
        sources: dict[Instance, list[Instance | None]] = {}
        for inst in instances:
            step = self.steps[inst.head]
            src = []
            for ref in self.refs[inst.head]:
                if ref == inst.head or ref in step.sees:  # the previous round
                    src.append(Instance(ref, inst.round - 1) if inst.round > 1 else None)
                elif inst.head in looped and ref == looped[inst.head]:  # a critic reads its round's draft
                    src.append(Instance(ref, inst.round))
                else:
                    if final.get(ref, 0) == 0:
                        raise TeamError(f"step {inst.head!r} reads {{{ref}}}, which never runs")
                    src.append(Instance(ref, final[ref]))
            sources[inst] = src
        return instances, sources

    def _toposort(self) -> list[Instance]:
        state: dict[Instance, int] = {}
        order: list[Instance] = []

        def visit(inst: Instance, path: list[Instance]):
            if state.get(inst) == 2:
                return
            if state.get(inst) == 1:
                cycle = " -> ".join(i.head for i in path[path.index(inst):] + [inst])
                raise TeamError(f"the team has a cycle: {cycle} (use Step(..., rounds=N, sees=...) for a loop)")
            state[inst] = 1
            for src in self.sources[inst]:
                if src is not None:
                    visit(src, path + [inst])
            state[inst] = 2
            order.append(inst)

        for inst in self.instances:
            visit(inst, [])
        return order

    def final_instances(self) -> dict[str, Instance]:
        out: dict[str, Instance] = {}
        for inst in self.instances:
            if inst.head not in out or inst.round > out[inst.head].round:
                out[inst.head] = inst
        return out

    def check_variables(self, variables: dict) -> None:
        missing = [v for v in self.variables if v not in variables]
        if missing:
            raise TeamError(f"missing team variable(s): {', '.join(missing)} (pass them to run(...))")

    # ---- running -------------------------------------------------------------------------------------------
    def start(self, **variables) -> "TeamRun":
        """Start a run and return its live handle at once."""
        from .run import TeamRun

        self.check_variables(variables)
        return TeamRun(self, variables).start()

    def run(self, **variables) -> "TeamRun":
        """Run to the end (KeyboardInterrupt cancels every step and frees its pages)."""
        return self.start(**variables).wait()

    def sequential(self, **variables) -> dict[str, object]:
        """Run the steps one by one with `ws.generate`, each after its inputs finished (the naive baseline).

        Returns instance -> Completion; the prompts are the ones a streamed run builds."""
        from .run import TeamRun

        self.check_variables(variables)
        builder = TeamRun(self, variables)
        done: dict = {}
        for inst in self.order:
            ups = {src: (done[src].token_ids, done[src].text) for src in self.sources[inst] if src is not None}
            ids = builder.build_reference(inst, ups)
            done[inst] = self.ws.generate(inst.head, ids, **self.steps[inst.head].options)
        return done

    def __repr__(self) -> str:
        edges = ", ".join(f"{h}<-{'+'.join(r) or '-'}" for h, r in self.refs.items())
        return f"Team({edges}; variables: {', '.join(self.variables) or 'none'})"
