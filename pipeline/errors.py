"""User-facing errors: the CLI prints these as one line and exits non-zero, without a traceback."""


class UserError(Exception):
    """A mistake the user can fix (bad input, missing file, corrupted data). Message: one line naming the culprit."""
