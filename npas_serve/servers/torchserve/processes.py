"""The live processes of a process group, read from /proc.

TorchServe runs as a group of its own (launcher, java, Python workers): stopping it means
signalling the group and waiting until none of its members is alive. Zombies do not count:
they hold no resources and vanish when their parent reaps them.
"""
from __future__ import annotations

import os
from pathlib import Path


def group_pids(pgid: int) -> list[int]:
    """PIDs of the live (not zombie) processes whose process group is `pgid`."""
    return [p for p in _pids() if _pgid_of(p) == pgid and not _zombie(p)]


def _pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def _pgid_of(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except (ProcessLookupError, PermissionError):
        return None


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True      # gone while we looked: not alive either
