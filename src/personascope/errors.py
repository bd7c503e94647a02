"""The one error type users see: what was wrong, with which input, and what to do."""


class PersonascopeError(Exception):
    """A user-facing error. The CLI prints its message as one line and exits with `exit_code` (1; `InputError` 2)."""

    exit_code: int = 1


class InputError(PersonascopeError):
    """A value the user gave is out of its range (NaN, inf, negative, too large, …): the CLI exits 2."""

    exit_code = 2
