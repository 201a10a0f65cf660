"""Path questions the command line and the model writer both ask."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["same_file"]


def same_file(a: Path, b: Path) -> bool:
    """Whether `a` and `b` are one existing file (links and other spellings included)."""
    try:
        return os.path.samefile(a, b)
    except OSError:  # either is missing or unreadable: not the same existing file
        return False
