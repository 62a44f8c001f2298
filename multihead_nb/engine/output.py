"""Incremental detokenization: token ids in, text deltas out, never splitting a multi-byte character.

Owns: the offsets trick (decode a short window and emit only text that is complete). Knows nothing of requests.
"""

from __future__ import annotations


class IncrementalDetokenizer:
    def __init__(self, tokenizer, prompt_tail: list[int] | None = None):
        self.tokenizer = tokenizer
        self.ids: list[int] = list(prompt_tail or [])[-4:]
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.text = ""
        self.last_delta = ""

    def push(self, token_id: int) -> str:
        """Append one token; return the newly complete text (may be "" while a character is incomplete)."""
        self.ids.append(token_id)
        self.last_delta = ""
        prefix = self.tokenizer.decode(self.ids[self.prefix_offset : self.read_offset], skip_special_tokens=True)
        full = self.tokenizer.decode(self.ids[self.prefix_offset :], skip_special_tokens=True)
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            delta = full[len(prefix) :]
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.ids)
            self.text += delta
            self.last_delta = delta
            return delta
        return ""
