"""Temporary directories that a killed process cannot strand for ever.

A ``finally`` removes a temporary directory on every exit Python sees (an exception, SIGINT,
SIGTERM), but not on SIGKILL or a power loss. So each directory made here holds a lock for
as long as its owner lives: an advisory ``flock`` on a file inside it (``.owner.lock``),
which the kernel releases when the owner's process ends, however it ends. The next process
that makes a directory of the same kind in the same place removes those whose lock it can
take: their owner is gone.

Only our own are touched: a directory of the right name pattern, owned by this user, with
the lock file in it. The lock is taken before the lock file gets its name (it is created as
``.owner.lock.new`` and renamed), so a directory is never seen unlocked while its owner is
still setting it up. What remains open is the few microseconds between ``mkdtemp`` and that
rename: a directory killed then has no lock file and is left alone.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import stat
import tempfile
from pathlib import Path

__all__ = ["Scratch", "remove_abandoned"]

_LOCK = ".owner.lock"


class Scratch:
    """A new directory in `parent` named ``<prefix>XXXXXXXX<suffix>``, locked until
    :meth:`cleanup` removes it. Abandoned ones go first: those named
    ``<sweep_prefix>*<suffix>`` (by default the same prefix)."""

    def __init__(
        self,
        parent: str | os.PathLike[str],
        prefix: str,
        suffix: str = "",
        *,
        sweep_prefix: str | None = None,
    ) -> None:
        remove_abandoned(parent, prefix if sweep_prefix is None else sweep_prefix, suffix)
        self.path = Path(tempfile.mkdtemp(prefix=prefix, suffix=suffix, dir=parent))
        self._lock: int | None = None
        try:
            self._lock = _hold(self.path)
        except BaseException:
            shutil.rmtree(self.path, ignore_errors=True)
            raise

    @property
    def name(self) -> str:
        return str(self.path)

    def __enter__(self) -> Scratch:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.cleanup()

    def cleanup(self) -> None:
        """Remove the directory, then let go of its lock (idempotent)."""
        if self._lock is None:
            return
        shutil.rmtree(self.path, ignore_errors=True)
        os.close(self._lock)
        self._lock = None


def _hold(directory: Path) -> int:
    unnamed = directory / (_LOCK + ".new")
    descriptor = os.open(unnamed, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        os.rename(unnamed, directory / _LOCK)
    except BaseException:
        os.close(descriptor)
        raise
    return descriptor


def remove_abandoned(parent: str | os.PathLike[str], prefix: str, suffix: str = "") -> list[str]:
    """Remove this user's `prefix`*`suffix` directories in `parent` whose owner is gone;
    the names removed. Anything unreadable or not ours is left as it is."""
    removed: list[str] = []
    try:
        entries = list(os.scandir(parent))
    except OSError:
        return removed
    for entry in entries:
        name = entry.name
        if not (name.startswith(prefix) and name.endswith(suffix)) or len(name) <= len(
            prefix + suffix
        ):
            continue
        with contextlib.suppress(OSError):
            status = entry.stat(follow_symlinks=False)
            if not stat.S_ISDIR(status.st_mode) or status.st_uid != os.geteuid():
                continue
            if _remove_if_abandoned(Path(entry.path)):
                removed.append(name)
    return removed


def _remove_if_abandoned(directory: Path) -> bool:
    try:
        descriptor = os.open(directory / _LOCK, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:  # no lock file: not one of ours, or its owner is still setting it up
        return False
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False  # its owner is alive
        # Held by us now: no owner can come back to it (a new owner makes a new directory).
        shutil.rmtree(directory, ignore_errors=True)
        return True
    finally:
        os.close(descriptor)
