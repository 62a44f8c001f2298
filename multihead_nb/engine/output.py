"""A request's output: token ids in, text out, stop conditions, and the text streamed to its reader.

Owns: incremental detokenization (decode a short window and emit only complete text, never half of a multi-byte
character that can still complete), stop strings (cut from the text; a possible stop-string prefix is held back from
the stream), the end conditions (end-of-sequence ids, max_tokens, the model's context), and pushing text deltas to
the request's queue.
Knows nothing of scheduling, pages or the recorder.
"""

from __future__ import annotations

from .request import Request


# Tokens that may wait for their text. No UTF-8 character spans more than 4 bytes and every token carries at least
# one, so in valid text at most 3 tokens wait for a character to complete; a longer wait means broken bytes (which
# decode to U+FFFD and never complete) or tokens without text (special tokens, skipped). Past this many the text is
# emitted as it stands and the textless tokens leave the window, which (decoded twice per token) would otherwise
# grow with the output: on a random-weight model's stream of stray bytes the windows went from 25 tokens on average
# (up to 250) to 6 (up to 16), the decoding in a batch-3 step from 0.15 to 0.09 ms.
MAX_PENDING = 8


class IncrementalDetokenizer:
    def __init__(self, tokenizer, prompt_tail: list[int] | None = None):
        self.tokenizer = tokenizer
        self.ids: list[int] = list(prompt_tail or [])[-4:]
        self.prefix_offset = 0
        self.read_offset = len(self.ids)

    def push(self, token_id: int) -> str:
        """Append one token; return the newly complete text (may be "" while a character is incomplete)."""
        self.ids.append(token_id)
        prefix = self.tokenizer.decode(self.ids[self.prefix_offset : self.read_offset], skip_special_tokens=True)
        full = self.tokenizer.decode(self.ids[self.prefix_offset :], skip_special_tokens=True)
        waited = len(self.ids) - self.read_offset >= MAX_PENDING
        if len(full) > len(prefix) and (waited or not full.endswith("\ufffd")):
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.ids)
            return full[len(prefix) :]
        if waited and len(full) <= len(prefix):  # the waiting tokens add no text: they leave the window
            del self.ids[self.read_offset :]
        return ""


def append_token(req: Request, tok: int, tokenizer, eos_ids: frozenset[int], max_context: int) -> tuple[str, str | None]:
    """Append sampled token `tok` to `req`'s output: (the text it completed, why the request ends now or None)."""
    req.output_ids.append(tok)
    if req.detokenizer is None:
        req.detokenizer = IncrementalDetokenizer(tokenizer, req.prompt_ids)
    delta = req.detokenizer.push(tok)
    req.text += delta
    reason = None
    if tok in eos_ids and not req.params.ignore_eos:
        reason = "stop"
    for s in req.params.stop:
        cut = req.text.find(s, max(0, len(req.text) - len(delta) - len(s)))
        if cut >= 0:
            req.text = req.text[:cut]
            reason = "stop"
            break
    if reason is None and len(req.output_ids) >= req.params.max_tokens:
        reason = "length"
    if reason is None and req.num_tokens >= max_context:
        reason = "length"
    return delta, reason


def emit(req: Request, final: bool = False) -> None:
    """Push the text not yet streamed to the request's reader; while it runs, hold back what could still become
    a stop string."""
    hold_back = 0 if final else max((len(s) - 1 for s in req.params.stop), default=0)
    upto = max(req.emitted, len(req.text) - hold_back)
    if upto > req.emitted:
        req.deltas.put(req.text[req.emitted : upto])
        req.emitted = upto
