"""A team run: submitting step instances, streaming upstream output into downstream prompts, and the results.

Owns: one run's live state (which instance is submitted, how far each downstream prompt has grown), the reaction
to bus messages from upstream heads, JSON checks, failure and cancellation of the whole run, and the run's
frames. Knows nothing of pages or tensors: prompt changes go to the engine through `call_soon`, so they land
before the next step is scheduled, in order.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

import pandas as pd

from ..engine.request import Status
from ..errors import MultiHeadError, TeamError
from .handoff import SENTINEL, UpstreamFeed, encode, reference_ids, same_tokenizer, split_rendered
from .json_output import parse_json_output

if TYPE_CHECKING:
    from .team import Instance, Team


class _Target:
    """A downstream instance's prompt under construction."""

    def __init__(self, pieces, sources, feeds, tokenizer):
        self.pieces = pieces  # literal texts around the references
        self.sources = sources  # per reference: the Instance it reads, or None (round 1 of a loop: "")
        self.feeds = feeds  # per reference: UpstreamFeed or None
        self.tokenizer = tokenizer
        self.cursor = 0  # next reference whose output is being appended
        self.flushed = 0  # ids of feeds[cursor] already appended
        self.base = 0  # prompt length where feeds[cursor]'s ids begin
        self.ids: list[int] = encode(tokenizer, pieces[0])  # the prompt as built so far
        self.closed = False
        self.handle = None


class TeamRun:
    def __init__(self, team: "Team", variables: dict):
        self.team, self.ws, self.variables = team, team.ws, dict(variables)
        self.id = self.ws.new_run_id()
        self.cancelled = False
        self.error: TeamError | None = None
        self.json: dict = {}
        self._targets: dict[Instance, _Target] = {}
        self._started: set = set()  # instances whose request produced a token (or finished)
        self._finished: set = set()
        self._by_request: dict[int, Instance] = {}
        self._done = threading.Event()
        self._lock = threading.RLock()
        self._subs = []
        self.t_start = self.t_end = None

    # ---- set-up --------------------------------------------------------------------------------------------
    def _build_target(self, inst: "Instance") -> _Target:
        step = self.team.steps[inst.head]
        refs = self.team.refs[inst.head]
        sentinels = {r: SENTINEL.format(i) for i, r in enumerate(refs)}
        try:
            content = step.template.format(**{**self.variables, **sentinels})
        except (KeyError, IndexError, ValueError) as e:
            raise TeamError(f"step {inst.head!r}: cannot fill its template: {e}") from None
        rendered = self.ws.render_prompt(inst.head, content)
        pieces, order = split_rendered(rendered, refs)
        occurrences = [refs.index(r) for r in order]
        srcs_by_ref = dict(zip(refs, self.team.sources[inst]))
        sources = [srcs_by_ref[refs[i]] for i in occurrences]
        down_tok = self.ws.tokenizer(inst.head)
        feeds = []
        for src in sources:
            if src is None:
                feeds.append(None)
                continue
            up_tok = self.ws.tokenizer(src.head)
            same = same_tokenizer(up_tok, down_tok)
            eos = self.ws.eos_ids(src.head)
            feeds.append(UpstreamFeed(same, eos, down_tok))
        return _Target(pieces, sources, feeds, down_tok)

    def start(self) -> "TeamRun":
        self.t_start = self.ws.now()
        for inst in self.team.order:
            self._targets[inst] = self._build_target(inst)
        heads = {i.head for i in self.team.instances}
        for h in heads:
            self._subs.append(self.ws.bus.subscribe(h, callback=self._on_message))
        with self._lock:
            for inst in self.team.order:
                self._maybe_submit(inst)
        return self

    # ---- reacting to upstream output (engine thread) -------------------------------------------------------
    def _maybe_submit(self, inst) -> None:
        t = self._targets[inst]
        if t.handle is not None or self._done.is_set():
            return
        if any(s is not None and s not in self._started for s in t.sources):
            return
        step = self.team.steps[inst.head]
        tag = {"team_run": self.id, "team_step": inst.head, "round": inst.round}
        try:
            t.handle = self.ws.submit_ids(inst.head, list(t.ids), prompt_open=True, tag=tag, **step.options)
        except MultiHeadError as e:
            return self._fail(f"step {inst.head!r} (round {inst.round}) could not start: {e}")
        self._by_request[t.handle.id] = inst
        self._pump(inst)

    def _on_message(self, msg) -> None:
        with self._lock:
            inst = self._by_request.get(msg.request)
            if inst is None or self._done.is_set():
                return
            if msg.kind == "tokens":
                self._started.add(inst)
                for target_inst, t in self._targets.items():
                    for k, src in enumerate(t.sources):
                        if src == inst:
                            t.feeds[k].on_token(msg.payload[0], msg.text)
                    self._maybe_submit(target_inst)
                    self._pump(target_inst)
            elif msg.kind == "end":
                self._on_end(inst, msg)

    def _on_end(self, inst, msg) -> None:
        req = self._targets[inst].handle.request
        if req.status != Status.FINISHED:
            cause = req.error or f"it ended as {req.finish_reason or req.status.value}"
            return self._fail(f"step {inst.head!r} (round {inst.round}) failed: {cause}")
        step = self.team.steps[inst.head]
        if step.json:
            try:
                self.json[inst.head] = parse_json_output(req.text, step.schema)
            except ValueError as e:
                return self._fail(f"step {inst.head!r} (round {inst.round}) gave invalid JSON: {e}")
            self.ws.bus.publish(f"{inst.head}.json", self.json[inst.head], kind="json", sender=inst.head,
                                request=req.id)
        self._started.add(inst)
        self._finished.add(inst)
        for target_inst, t in self._targets.items():
            for k, src in enumerate(t.sources):
                if src == inst:
                    self._finish_feed(target_inst, k, req.text)
            self._maybe_submit(target_inst)
            self._pump(target_inst)
        if len(self._finished) == len(self._targets):
            self._end()

    def _finish_feed(self, target_inst, k: int, text: str) -> None:
        t = self._targets[target_inst]
        keep, _ = t.feeds[k].finish(text)
        if t.cursor == k and t.flushed > keep and t.handle is not None:  # re-tokenized differently: roll back
            cut = t.base + keep
            self.ws.truncate_prompt(t.handle, cut)
            del t.ids[cut:]
            t.flushed = keep

    def _pump(self, inst) -> None:
        """Append what is available to the instance's prompt; close it once every reference is complete."""
        t = self._targets[inst]
        if t.handle is None or t.closed:
            return
        new: list[int] = []
        while t.cursor < len(t.sources):
            feed = t.feeds[t.cursor]
            if feed is not None:
                new += feed.ids[t.flushed :]
                t.flushed = len(feed.ids)
                if not feed.finished:
                    break
            new += encode(t.tokenizer, t.pieces[t.cursor + 1])
            t.cursor += 1
            t.flushed = 0
            t.base = len(t.ids) + len(new)
        close = t.cursor == len(t.sources)
        t.ids += new
        if new or close:
            self.ws.extend_prompt(t.handle, new, close=close)
        t.closed = close

    # ---- ending --------------------------------------------------------------------------------------------
    def _fail(self, message: str) -> None:
        self.error = TeamError(message)
        for t in self._targets.values():
            if t.handle is not None and not t.handle.request.status.done:
                t.handle.cancel(wait=False)
        self._end()

    def _end(self) -> None:
        self.t_end = self.ws.now()
        for s in self._subs:
            s.close()
        self._done.set()

    def cancel(self) -> None:
        """Cancel every step of the run and free its pages."""
        with self._lock:
            if not self._done.is_set():
                self.cancelled = True
                self._fail("the run was cancelled")
        self.ws.sync()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def wait(self, timeout: float | None = None) -> "TeamRun":
        """Block until the run ends; raise its TeamError if a step failed."""
        try:
            self.ws.run_until(self._done.is_set, timeout)
        except KeyboardInterrupt:
            self.cancel()
            raise
        if self.error is not None and not self.cancelled:
            raise self.error
        return self

    # ---- results -------------------------------------------------------------------------------------------
    @property
    def outputs(self) -> dict[str, str]:
        """Head -> text of its last round (partial while running)."""
        out = {}
        for head, inst in self.team.final_instances().items():
            t = self._targets.get(inst)
            out[head] = "" if t is None or t.handle is None else t.handle.request.text
        return out

    def prompt_ids(self, head: str, round: int | None = None) -> list[int]:
        """The prompt ids the instance was run with (as streaming built them)."""
        inst = self._instance(head, round)
        return list(self._targets[inst].handle.request.prompt_ids)

    def reference_prompt_ids(self, head: str, round: int | None = None) -> list[int]:
        """The prompt ids built from the finished upstream outputs (what waiting would have given)."""
        inst = self._instance(head, round)
        ups = {}
        for src in self._targets[inst].sources:
            if src is not None:
                req = self._targets[src].handle.request
                ups[src] = (list(req.output_ids), req.text)
        return self.build_reference(inst, ups)

    def build_reference(self, inst, upstream: dict) -> list[int]:
        """Prompt ids of `inst` given each source instance's finished (token ids, text)."""
        t = self._targets.get(inst) or self._build_target(inst)
        ups, eos = [], set()
        for src, feed in zip(t.sources, t.feeds):
            if src is None:
                ups.append("")
                continue
            ids, text = upstream[src]
            ups.append(ids if feed.same_tokenizer else text)
            eos |= feed.eos_ids
        return reference_ids(t.pieces, ups, t.tokenizer, frozenset(eos))

    def _instance(self, head, round):
        insts = [i for i in self._targets if i.head == head and (round is None or i.round == round)]
        if not insts:
            raise TeamError(f"no step {head!r} (round {round}) in this run")
        return max(insts, key=lambda i: i.round)

    def _request_ids(self) -> set[int]:
        return {t.handle.id for t in self._targets.values() if t.handle is not None}

    @property
    def tokens(self) -> pd.DataFrame:
        frames = [t.handle.tokens() for t in self._targets.values() if t.handle is not None]
        frames = [f for f in frames if len(f)]
        if not frames:
            return self.ws.tokens().iloc[0:0]
        return pd.concat(frames, ignore_index=True).sort_values(["t", "request"]).reset_index(drop=True)

    @property
    def steps(self) -> pd.DataFrame:
        df = self.ws.steps()
        end = self.t_end if self.t_end is not None else float("inf")
        return df[(df.t_end >= (self.t_start or 0)) & (df.t_start <= end)].reset_index(drop=True)

    @property
    def messages(self) -> pd.DataFrame:
        df = self.ws.bus.messages()
        return df[df.request.isin(self._request_ids())].reset_index(drop=True)

    def timeline(self) -> pd.DataFrame:
        """One row per head and round: start (arrival), first_token, end (seconds since the workspace started)."""
        rows = []
        for inst, t in self._targets.items():
            r = t.handle.request if t.handle is not None else None
            rows.append({
                "head": inst.head, "round": inst.round, "request": r.id if r else None,
                "start": r.arrival if r else None, "first_token": r.first_token_time if r else None,
                "end": r.finish_time if r else None, "prompt_tokens": len(r.prompt_ids) if r else 0,
                "output_tokens": len(r.output_ids) if r else 0,
                "finish_reason": r.finish_reason if r else None,
            })
        return pd.DataFrame(rows).sort_values(["start", "head"], na_position="last").reset_index(drop=True)

    def plot(self):
        from ..notebook.widgets.figures import timeline_figure

        return timeline_figure(self.timeline(), self.tokens, self.steps)

    def __repr__(self) -> str:
        state = "failed" if self.error else ("done" if self.done else "running")
        return f"TeamRun(id={self.id}, {state}, heads={list(self.outputs)})"
