"""What memory the machine has free and this process holds, for the whole-model check's
gates: read from Linux's /proc, None where it cannot be read (another system, a sandbox)."""

from __future__ import annotations

__all__ = ["available_memory", "resident_bytes"]


def available_memory() -> int | None:
    """MemAvailable: what the kernel can hand out without swapping."""
    return _proc_bytes("/proc/meminfo", "MemAvailable:")


def resident_bytes() -> int | None:
    """This process's resident memory (VmRSS)."""
    return _proc_bytes("/proc/self/status", "VmRSS:")


def _proc_bytes(path: str, field: str) -> int | None:
    """The value of `field` in a /proc file of ``name: value kB`` lines, in bytes."""
    try:
        with open(path) as lines:
            for line in lines:
                if line.startswith(field):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None
