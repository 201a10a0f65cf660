"""What every results file records about where its numbers come from."""

from __future__ import annotations

import subprocess

__all__ = ["commit"]


def commit() -> str:
    """The checkout's HEAD, or "unknown" outside a git checkout."""
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
