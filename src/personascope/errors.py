"""The one error type users see: what was wrong, with which input, and what to do."""


class PersonascopeError(Exception):
    """A user-facing error. The CLI prints its message as one line and exits with `exit_code` (1 unless a command
    gives its own: `personascope gate` keeps 1 for a failed gate and exits 2 on bad input)."""

    exit_code: int = 1
