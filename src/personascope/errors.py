"""The one error type users see: what was wrong, with which input, and what to do."""


class PersonascopeError(Exception):
    """A user-facing error. The CLI prints its message as one line and exits non-zero."""
