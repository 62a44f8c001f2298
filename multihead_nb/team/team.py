"""Teams: a graph of steps, one per head, whose prompt templates name the heads whose output they need.

Owns: reading templates (a placeholder naming a team head is that head's output, any other is a run variable),
validation before anything runs (unknown head, cycle, missing variable), refine loops (`rounds`), the plan of
step *instances* (head, round) with the instance each reference reads, and a team's name, variable defaults, input
and output (what a team file and the server use). Knows nothing of pages or tensors; a step is `step.py`, a run
`TeamRun` (run.py), a team file `files.py`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..errors import MultiHeadError, TeamError
from .step import Step, placeholders

if TYPE_CHECKING:
    from .run import TeamRun
    from ..workspace.workspace import Workspace


@dataclass(frozen=True)
class Instance:
    head: str
    round: int  # 1-based


class Team:
    """Steps (head -> template or Step) bound to a workspace; `run(**vars)` or `start(**vars)`."""

    def __init__(self, ws: "Workspace", steps: dict, *, name: str | None = None, defaults: dict | None = None,
                 input: str | None = None, output: str | None = None, description: str = ""):
        self.ws = ws
        self._build(steps, ws.heads)
        self._set_options(name=name, defaults=defaults, input=input, output=output, description=description)

    @classmethod
    def check(cls, steps: dict, heads: dict, **options) -> "Team":
        """Validate `steps` against head definitions (name -> Head) without a workspace: the same errors as
        `Team(ws, steps, ...)`, raised before any head is added (team files use this). The result cannot run."""
        team = cls.__new__(cls)
        team.ws = None
        team._build(steps, heads)
        team._set_options(**options)
        return team

    def _set_options(self, *, name=None, defaults=None, input=None, output=None, description="") -> None:
        self.name, self.description = name, description
        self.defaults = dict(defaults or {})  # variable -> value used when a run does not give it
        unknown = sorted(set(self.defaults) - set(self.variables))
        if unknown:
            raise TeamError(f"a default for {unknown[0]!r}, which is not a variable of this team (variables: "
                            f"{', '.join(self.variables) or 'none'})")
        if input is not None and input not in self.variables:
            raise TeamError(f"input {input!r} is not a variable of this team (variables: "
                            f"{', '.join(self.variables) or 'none'})")
        if output is not None and output not in self.steps:
            raise TeamError(f"output {output!r} is not a step of this team (steps: {', '.join(self.steps)})")
        self.input, self.output = input, output

    def _build(self, steps: dict, heads: dict) -> None:
        if not isinstance(steps, dict) or not steps:
            raise TeamError("a team needs a dict of at least one step: {head: template}")
        self.steps: dict[str, Step] = {}
        for head, step in steps.items():
            if head not in heads:
                known = ", ".join(sorted(heads)) or "none"
                raise TeamError(f"team step {head!r} names no head of this workspace (heads: {known})")
            self.steps[head] = step if isinstance(step, Step) else Step(step)
            try:
                heads[head].sampling.replace(**self.steps[head].options)
            except MultiHeadError as e:
                raise TeamError(f"step {head!r}: {e}") from None
        self.refs: dict[str, list[str]] = {}
        self.variables: list[str] = []
        for head, step in self.steps.items():
            names = placeholders(step.template)
            self.refs[head] = [n for n in names if n in self.steps]
            for n in names:
                if n not in self.steps:
                    if n in heads:
                        raise TeamError(f"step {head!r} reads {{{n}}}, a head that is not a step of this team")
                    if n not in self.variables:
                        self.variables.append(n)
            for s in step.sees:
                if s not in self.steps:
                    raise TeamError(f"step {head!r} sees {s!r}, which is not a step of this team")
        self.instances, self.sources = self._plan()
        self.order = self._toposort()

    @property
    def output_head(self) -> str:
        """The step whose answer is the team's answer (served over HTTP): `output`, else the last step no other
        step reads."""
        if self.output is not None:
            return self.output
        # a step is read when another step reads it, except a critic reading the step it serves (a refine loop)
        read = {r for h, refs in self.refs.items() for r in refs if r != h and h not in self.steps[r].sees}
        sinks = [h for h in self.steps if h not in read]
        return (sinks or list(self.steps))[-1]

    @property
    def input_variable(self) -> str | None:
        """The variable a user message fills (served over HTTP): `input`, else the first variable."""
        return self.input if self.input is not None else (self.variables[0] if self.variables else None)

    def save(self, path, *, variables: dict | None = None):
        """Write this team (its heads' definitions, its steps, variable defaults, given `variables` added) to a YAML
        or JSON team file (by the suffix); returns its path. `mh.load_team(path, ws)` reads it back."""
        from .files import save_team

        return save_team(self, path, variables=variables)

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

    def with_defaults(self, variables: dict) -> dict:
        return {**{k: v for k, v in self.defaults.items() if k in self.variables}, **variables}

    def check_variables(self, variables: dict) -> None:
        missing = [v for v in self.variables if v not in variables]
        if missing:
            raise TeamError(f"missing team variable(s): {', '.join(missing)} (pass them to run(...))")

    # ---- running -------------------------------------------------------------------------------------------
    def start(self, **variables) -> "TeamRun":
        """Start a run and return its live handle at once."""
        from .run import TeamRun

        variables = self.with_defaults(variables)
        self.check_variables(variables)
        return TeamRun(self, variables).start()

    def run(self, **variables) -> "TeamRun":
        """Run to the end (KeyboardInterrupt cancels every step and frees its pages)."""
        return self.start(**variables).wait()

    def sequential(self, **variables) -> dict[str, object]:
        """Run the steps one by one with `ws.generate`, each after its inputs finished (the naive baseline).

        Returns instance -> Completion; the prompts are the ones a streamed run builds."""
        from .run import TeamRun

        variables = self.with_defaults(variables)
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
