"""Pure parsing of what the magics read: the `%%team` cell body, `--var k=v` pairs, sizes and head options.

Owns: turning text into plain Python values and one-line `MagicSyntaxError`s (a `ConfigError`) naming the line.
Knows nothing of IPython, workspaces or models: `magic.py` turns these errors into `UsageError`s.
"""

from __future__ import annotations

import re

from ...backends.native.cpu_isa import ISAS
from ...config import parse_size
from ...errors import ConfigError
from ...workspace.heads import HEAD_OPTIONS

_STEP = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)\s*:\s?(.*)$")

class MagicSyntaxError(ConfigError):
    """A malformed magic input; the message is one line."""


def parse_team(body: str) -> dict[str, str]:
    """`head: prompt template` per line -> {head: template}, in order.

    An indented line continues the previous step's prompt (joined with a newline, its indentation removed);
    blank lines and lines starting with `#` are skipped. A head may appear once.
    """
    steps: dict[str, list[str]] = {}
    last: str | None = None
    for no, raw in enumerate(body.splitlines(), start=1):
        line = raw.rstrip()
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if line[0] in " \t":
            if last is None:
                raise MagicSyntaxError(f"team line {no}: an indented line must continue a step, got {line.strip()!r}")
            steps[last].append(line.strip())
            continue
        m = _STEP.match(line)
        if not m:
            raise MagicSyntaxError(f"team line {no}: expected 'head: prompt template', got {_short(line)!r}")
        head, prompt = m.group(1), m.group(2).strip()
        if head in steps:
            raise MagicSyntaxError(f"team line {no}: head {head!r} has a step already (one step per head)")
        steps[head] = [prompt] if prompt else []
        last = head
    if not steps:
        raise MagicSyntaxError("the team is empty: write one step per line, like 'coder: Write {task}'")
    for head, lines in steps.items():
        if not lines:
            raise MagicSyntaxError(f"step {head!r} has an empty prompt")
    return {head: "\n".join(lines) for head, lines in steps.items()}


def parse_vars(pairs: list[str] | None) -> dict[str, str]:
    """['task=sort a list', 'n=3'] -> {'task': 'sort a list', 'n': '3'} (values stay strings)."""
    out: dict[str, str] = {}
    for pair in pairs or ():
        key, sep, value = pair.partition("=")
        key = key.strip()
        if not sep or not key.isidentifier():
            raise MagicSyntaxError(f"--var expects NAME=VALUE with NAME a Python identifier, got {pair!r}")
        out[key] = value
    return out


def parse_size_arg(value: str, what: str) -> int:
    """Bytes from '8MiB', '1GiB', '4096'; a `MagicSyntaxError` naming `what` otherwise."""
    try:
        return parse_size(value.strip() if isinstance(value, str) else value, what=what)
    except ConfigError as e:
        raise MagicSyntaxError(str(e)) from None


# `Workspace(cpu_kernel=...)` by its magic spelling: auto (None), on (True), off (False) or a build's name
CPU_KERNEL_WORDS = {"auto": None, "on": True, "off": False, **{isa: isa for isa in ISAS}}


def parse_cpu_kernel(value: str):
    """`Workspace(cpu_kernel=...)` from one of CPU_KERNEL_WORDS; a `MagicSyntaxError` listing them otherwise."""
    if value not in CPU_KERNEL_WORDS:
        raise MagicSyntaxError(f"--cpu-kernel {value!r}: expected one of {', '.join(CPU_KERNEL_WORDS)}")
    return CPU_KERNEL_WORDS[value]


def head_options(args: object, max_tokens_default: int | None = None) -> dict:
    """The head options given on a `%%head` line (argparse namespace -> {option: value}), None left out."""
    opts = {}
    for name in HEAD_OPTIONS:  # each flag's argparse dest is the option's name; the core validates the values
        value = getattr(args, name, None)
        if value is not None:
            opts[name] = tuple(value) if name == "stop" else value
    if "max_tokens" not in opts and max_tokens_default is not None:
        opts["max_tokens"] = max_tokens_default
    return opts


def join_words(words: list[str]) -> str:
    """The rest of a magic line as one prompt ("run coder write a sort" -> "write a sort")."""
    text = " ".join(words).strip()
    if not text:
        raise MagicSyntaxError("the prompt is empty")
    return text


def first_line(message: object) -> str:
    """The first non-empty line of an error message (UsageErrors are one line)."""
    for line in str(message).splitlines():
        if line.strip():
            return line.strip()
    return type(message).__name__ if isinstance(message, BaseException) else "error"


def _short(text: str, n: int = 60) -> str:
    return text if len(text) <= n else text[: n - 3] + "..."
