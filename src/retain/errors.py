"""User-facing errors: the CLI prints these as one `error:` line and exits with code 2."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class RetainError(Exception):
    """A mistake in the user's input (config, data, paths) that the user can fix.

    The message names the input, what is wrong and how to fix it; the CLI shows it without a traceback.
    """


def did_you_mean(word: str, choices: Iterable[str], n: int = 3, cutoff: float = 0.5) -> str:
    """Return ' (did you mean: a, b?)' for the closest choices, or '' when nothing is close (difflib's
    similarity ratio below `cutoff`)."""
    close = difflib.get_close_matches(word, list(choices), n=n, cutoff=cutoff)
    return f" (did you mean: {', '.join(close)}?)" if close else ""
