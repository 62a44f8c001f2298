"""The "tokenizer" of a remote head: text <-> ids without a vocabulary, and chat messages framed so that the prompt
ids a team builds for the head can be turned back into the messages the remote engine is sent.

Owns: the ids (below 0x110000 a character's code point; from `PIECE_BASE` on, a text piece the remote engine sent,
numbered in the order first seen, one table per remote model) and the framing its chat template renders (each
message as `\\ue000role\\ue001content\\ue002`, private-use characters that prompts do not contain). A prompt's ids
decode to framed text and `messages()` reads the messages back; text without framing is one user message. Knows
nothing of HTTP, heads or requests.

Prompt text is encoded character by character, so every cut of a streamed prompt encodes exactly like the whole
(a team's handoff into a remote head builds the same ids whether it streams or waits); each piece the remote engine
streams back is one id, one row of the token frame.
"""

from __future__ import annotations

import threading

PIECE_BASE = 0x110000  # ids from here on are pieces of text the remote engine sent
ROLE, CONTENT, END = "\ue000", "\ue001", "\ue002"


class RemoteCodec:
    """Duck-types what MultiHead asks of a tokenizer: `__call__`, `decode`, `apply_chat_template`, `chat_template`,
    `eos_token_id`, `get_vocab`."""

    chat_template = "multihead-remote-framing"  # truthy: prompts go through `apply_chat_template`
    eos_token_id = None

    def __init__(self, key: str):
        self.key = key
        self._pieces: list[str] = []
        self._ids: dict[str, int] = {}
        self._lock = threading.Lock()

    # ---- text <-> ids -----------------------------------------------------------------------------------
    def __call__(self, text: str, add_special_tokens: bool = False) -> dict:
        return {"input_ids": [ord(c) for c in text]}

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [ord(c) for c in text]

    def piece_id(self, text: str) -> int:
        """The id of a text piece the remote engine sent (the same text, the same id)."""
        with self._lock:
            i = self._ids.get(text)
            if i is None:
                i = self._ids[text] = PIECE_BASE + len(self._pieces)
                self._pieces.append(text)
            return i

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        pieces = self._pieces
        out = []
        for i in ids:
            i = int(i)
            if 0 <= i < PIECE_BASE:
                out.append(chr(i))
            elif i - PIECE_BASE < len(pieces):
                out.append(pieces[i - PIECE_BASE])
            else:
                out.append("\ufffd")
        return "".join(out)

    def detokenizer(self) -> "PieceDetokenizer":
        return PieceDetokenizer(self)

    def get_vocab(self) -> dict:
        return {f"<remote {self.key}>": 0}  # unlike any other tokenizer's: handoffs to and from it pass text

    # ---- chat messages ----------------------------------------------------------------------------------
    def apply_chat_template(self, messages, add_generation_prompt: bool = True, tokenize: bool = False):
        text = "".join(f"{ROLE}{m['role']}{CONTENT}{_clean(m['content'])}{END}" for m in messages)
        return self.encode(text) if tokenize else text

    def messages(self, ids) -> list[dict]:
        """The chat messages a prompt's ids hold (text without framing: one user message)."""
        text = self.decode(ids)
        if not text.startswith(ROLE):
            return [{"role": "user", "content": text}]
        out = []
        for frame in text.split(END):
            if not frame:
                continue
            role, sep, content = frame.lstrip(ROLE).partition(CONTENT)
            if not frame.startswith(ROLE) or not sep:
                return [{"role": "user", "content": text}]  # not our framing after all: send it as it is
            out.append({"role": role, "content": content})
        return out


class PieceDetokenizer:
    """A remote request's detokenizer: each piece is complete text, emitted as it is (the incremental one holds a
    trailing U+FFFD back as half a character, which would lose it from a stream's last piece)."""

    def __init__(self, codec: RemoteCodec):
        self.codec = codec

    def push(self, token_id: int) -> str:
        return self.codec.decode([token_id])


def _clean(text: str) -> str:
    """Content with the framing characters replaced (they would cut the message short)."""
    return text.translate({ord(ROLE): "\ufffd", ord(CONTENT): "\ufffd", ord(END): "\ufffd"})
