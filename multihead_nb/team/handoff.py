"""Streamed handoff: building a downstream head's prompt from literal text and upstream heads' outputs.

Owns: splitting a rendered prompt into literal pieces and upstream references, turning each piece into the
downstream tokenizer's ids, and growing those ids while an upstream head is still generating. Between heads of
the same tokenizer the upstream's token ids pass through unchanged; across tokenizers the upstream text is
re-tokenized at safe boundaries (before a space that starts a word), and `finish` reports any difference from
tokenizing the whole text at once so the caller can roll the prompt back. Knows nothing of the engine or pages.

The prompt that waiting would have built (`reference_ids`) is, for literal pieces L and upstream outputs U:
    tok(L0) + ids(U1) + tok(L1) + ids(U2) + ... + tok(Lk)
where ids(U) is U's token ids without end-of-sequence tokens (same tokenizer), or tok(text of U)
(another tokenizer). Streaming builds exactly these ids.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

SENTINEL = "\x00MHREF{}\x00"
_SENTINEL_RE = re.compile("\x00MHREF(\\d+)\x00")


def split_rendered(rendered: str, refs: list[str]) -> tuple[list[str], list[str]]:
    """Literal pieces and the refs between them, from text rendered with `SENTINEL.format(i)` for ref i."""
    pieces, order, pos = [], [], 0
    for m in _SENTINEL_RE.finditer(rendered):
        pieces.append(rendered[pos : m.start()])
        order.append(refs[int(m.group(1))])
        pos = m.end()
    pieces.append(rendered[pos:])
    return pieces, order


def encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []


def same_tokenizer(a, b) -> bool:
    if a is b:
        return True
    try:
        return a.backend_tokenizer.to_str() == b.backend_tokenizer.to_str()
    except AttributeError:
        return a.get_vocab() == b.get_vocab()


@dataclass
class UpstreamFeed:
    """One upstream output flowing into a downstream prompt."""

    same_tokenizer: bool
    eos_ids: frozenset
    tokenizer: object  # the downstream tokenizer
    ids: list[int] = field(default_factory=list)  # ids appended so far for this upstream
    text: str = ""  # upstream text received (cross-tokenizer)
    committed: int = 0  # characters of `text` already tokenized into `ids`
    finished: bool = False

    def on_token(self, token_id: int, delta: str) -> list[int]:
        """New downstream ids for one upstream token."""
        if self.same_tokenizer:
            if token_id in self.eos_ids:
                return []
            self.ids.append(token_id)
            return [token_id]
        self.text += delta
        cut = _safe_cut(self.text, self.committed)
        if cut <= self.committed:
            return []
        new = encode(self.tokenizer, self.text[self.committed : cut])
        self.committed = cut
        self.ids.extend(new)
        return new

    def finish(self, final_text: str) -> tuple[int, list[int]]:
        """Close the feed. Returns (keep, tail): keep the first `keep` ids appended so far, then append `tail`;
        the result equals the reference ids for this upstream."""
        self.finished = True
        if self.same_tokenizer:
            return len(self.ids), []
        want = encode(self.tokenizer, final_text)
        keep = 0
        while keep < min(len(want), len(self.ids)) and want[keep] == self.ids[keep]:
            keep += 1
        tail = want[keep:]
        self.ids = want
        self.text, self.committed = final_text, len(final_text)
        return keep, tail


def _safe_cut(text: str, start: int) -> int:
    """The last position after `start` just before a space that is followed by a non-space (a word start)."""
    for i in range(len(text) - 2, start - 1, -1):
        if text[i] == " " and not text[i + 1].isspace() and i > start and not text[i - 1].isspace():
            return i
    return start


def reference_ids(pieces: list[str], upstream: list[list[int] | str], tokenizer, eos_ids=frozenset()) -> list[int]:
    """The prompt ids built after every upstream finished (ids lists pass through; texts are tokenized)."""
    out = encode(tokenizer, pieces[0])
    for up, piece in zip(upstream, pieces[1:]):
        if isinstance(up, str):
            out += encode(tokenizer, up)
        else:
            out += [t for t in up if t not in eos_ids]
        out += encode(tokenizer, piece)
    return out
