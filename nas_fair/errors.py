"""One exception type for bad user input, so the CLI can print one line and exit 2."""

from __future__ import annotations

import difflib
import errno
from collections.abc import Iterable


class UserError(ValueError):
    """Bad input from the user (CLI, TOML, data): the message names the problem and the fix."""


def did_you_mean(value: str, choices: Iterable[str]) -> str:
    """Suffix suggesting the closest valid choice, or '' when none is close."""
    close = difflib.get_close_matches(value, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def one_of(what: str, value: object, choices: Iterable[object]) -> UserError:
    """Error for a value outside a fixed set: states the rule and the value."""
    choices = list(choices)
    shown = ", ".join(str(c) for c in choices)
    hint = did_you_mean(str(value), [str(c) for c in choices]) if isinstance(value, str) else ""
    return UserError(f"{what} must be one of {shown}, got {value!r}{hint}")


def disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` (or what it was raised from) is a full disk or quota, from the OS or
    from SQLite (which reports it as "database or disk is full")."""
    seen = 0
    while exc is not None and seen < 10:
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "database or disk is full" in str(exc):
            return True
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
        seen += 1
    return False
