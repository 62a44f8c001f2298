"""The exceptions a user can cause, each naming its cause.

Owns: the error hierarchy. Knows nothing of models, pages or notebooks; the magics turn these into
`UsageError`s with the same one-line message.
"""


class MultiHeadError(Exception):
    """Base of every error MultiHead raises on purpose."""


class ConfigError(MultiHeadError, ValueError):
    """An option is unknown, malformed or out of range."""


class CheckpointError(MultiHeadError):
    """A checkpoint is missing, corrupt, or of an architecture we cannot run."""


class OutOfPagesError(MultiHeadError):
    """The pool has too few free pages for an allocation."""


class QuotaExceededError(OutOfPagesError):
    """An owner would exceed its page quota."""


class RequestError(MultiHeadError):
    """A request cannot be served (too long for the model or the pool, cancelled, failed)."""


class TeamError(MultiHeadError):
    """A team is malformed (cycle, unknown head, missing variable) or one of its steps failed."""
