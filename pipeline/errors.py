"""User-facing errors: the CLI prints these as one line and exits non-zero, without a traceback."""

import os


class UserError(Exception):
    """A mistake the user can fix (bad input, missing file, corrupted data). Message: one line naming the culprit."""


class EveryRankError(UserError):
    """A user error every process of a data-parallel run finds alike (params, inputs, a checkpoint): shown once.

    The command-line boundary prints it on rank 0 only (:func:`shown_here`); the other processes exit with the same
    code silently, so that the launcher reports one line instead of one per process."""


def shown_here(error: UserError) -> bool:
    """Whether this process prints ``error``: not an :class:`EveryRankError` on a launched rank other than 0, nor,
    under ``sae``'s own launcher (which reports the process that failed first), an error that only echoes another
    process's failure (``follows_another``: a collective that lost its peer)."""
    if getattr(error, "follows_another", False) and "SAE_LAUNCHER_PID" in os.environ:
        return False
    return not (isinstance(error, EveryRankError) and "LOCAL_RANK" in os.environ and os.environ.get("RANK", "0") != "0")
