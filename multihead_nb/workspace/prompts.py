"""Prompts as a model sees them: a head's system prompt and the user turn through the tokenizer's chat template,
and their token ids, with clear errors for what a caller can get wrong (message shapes, text the tokenizer cannot
take, a chat template that does not render). Knows nothing of heads beyond their system prompt, nor of the engine.
"""

from __future__ import annotations

from ..errors import CheckpointError, RequestError

ROLES = ("system", "user", "assistant", "tool")


def check_messages(prompt) -> list[dict]:
    """`prompt` as chat messages: a string is one user turn; a list must hold {"role": ..., "content": str}."""
    if isinstance(prompt, str):
        check_text(prompt, "the prompt")
        return [{"role": "user", "content": prompt}]
    if not isinstance(prompt, (list, tuple)) or not prompt:
        raise RequestError(f"a prompt is a string or a non-empty list of chat messages, got {prompt!r:.80}")
    for i, m in enumerate(prompt):
        if not isinstance(m, dict):
            raise RequestError(f"chat message {i} must be a dict with 'role' and 'content', got {m!r:.80}")
        if m.get("role") not in ROLES:
            raise RequestError(f"chat message {i} needs a 'role' in {ROLES}, got {m.get('role')!r}")
        if not isinstance(m.get("content"), str):
            raise RequestError(f"chat message {i} ({m['role']}) needs a string 'content', got {m.get('content')!r:.80}")
        check_text(m["content"], f"chat message {i}")
    return [dict(m) for m in prompt]


def render_prompt(tokenizer, system: str | None, prompt: str | list[dict]) -> str:
    """`prompt` (a user turn, or a list of chat messages used as given) through the chat template; without one,
    the messages' contents separated by blank lines. A string gets the head's system prompt first."""
    messages = check_messages(prompt)
    if isinstance(prompt, str) and system:
        messages.insert(0, {"role": "system", "content": system})
    if not getattr(tokenizer, "chat_template", None):
        return "\n\n".join(m["content"] for m in messages) + "\n\n"
    try:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    except Exception as e:
        raise RequestError(f"the chat template could not render these messages: {type(e).__name__}: {e}") from None


def check_text(text: str, what: str) -> None:
    """A `RequestError` naming the place if `text` is not valid Unicode text (a lone surrogate, say)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise RequestError(f"{what} is not valid text: {e.reason} at character {e.start} "
                           f"({text[max(0, e.start - 20):e.start]!r} then {text[e.start]!r})") from None


def encode_prompt(tokenizer, text: str) -> list[int]:
    """Token ids of rendered `text` (special tokens come from the template when there is one, else are added)."""
    check_text(text, "the rendered prompt")
    has_template = bool(getattr(tokenizer, "chat_template", None))
    return list(tokenizer(text, add_special_tokens=not has_template)["input_ids"])


def check_chat_template(tokenizer, where: str) -> None:
    """Raise a `CheckpointError` naming `where` if the tokenizer's chat template does not render a conversation
    (checked at load, so a broken template is refused by `add_head`, not by the first request)."""
    if not getattr(tokenizer, "chat_template", None):
        return
    probe = [{"role": "user", "content": "u"}]
    try:
        tokenizer.apply_chat_template(probe, add_generation_prompt=True, tokenize=False)
    except Exception as e:
        raise CheckpointError(f"the chat template of {where} does not render a conversation: "
                              f"{type(e).__name__}: {e}") from None
