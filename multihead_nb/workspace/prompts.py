"""Prompts as a model sees them: a head's system prompt and the user turn through the tokenizer's chat template,
and their token ids. Knows nothing of heads beyond their system prompt, nor of the engine.
"""

from __future__ import annotations

from ..errors import ConfigError


def render_prompt(tokenizer, system: str | None, prompt: str | list[dict]) -> str:
    """`prompt` (a user turn, or a list of chat messages used as given) through the chat template; without one,
    the messages' contents separated by blank lines."""
    if isinstance(prompt, str):
        messages = [{"role": "user", "content": prompt}]
        if system:
            messages.insert(0, {"role": "system", "content": system})
    elif isinstance(prompt, list) and all(isinstance(m, dict) for m in prompt):
        messages = prompt
    else:
        raise ConfigError(f"a prompt is a string or a list of chat messages, got {type(prompt).__name__}")
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return "\n\n".join(m["content"] for m in messages) + "\n\n"


def encode_prompt(tokenizer, text: str) -> list[int]:
    """Token ids of rendered `text` (special tokens come from the template when there is one, else are added)."""
    has_template = bool(getattr(tokenizer, "chat_template", None))
    return list(tokenizer(text, add_special_tokens=not has_template)["input_ids"])
