"""An exception as one line of text, for messages, reports and probe tables.

Two ways, for two readers: ``first_line`` keeps the message's own first line (what a person
reads after ``error:``); ``collapsed`` + ``clipped`` fold a multi-line ONNX Runtime message
into one line of bounded length, for table cells and report fields, after the caller has cut
whatever noise it does not want (node names, C++ signatures).
"""

from __future__ import annotations

__all__ = ["clipped", "collapsed", "first_line"]

# Report fields and probe footnotes stay readable; ORT messages can run to kilobytes.
_LIMIT = 300


def first_line(error: BaseException) -> str:
    """The message's first line, or the exception's type name when it has no message."""
    return (str(error).splitlines() or [type(error).__name__])[0]


def collapsed(error: BaseException) -> str:
    """The whole message on one line: every run of whitespace, newlines too, one space."""
    return " ".join(str(error).split())


def clipped(text: str, limit: int = _LIMIT) -> str:
    """At most `limit` characters, a cut marked with "..."."""
    return text if len(text) <= limit else text[: limit - 3] + "..."
