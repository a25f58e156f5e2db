"""Processes as /proc sees them."""

from __future__ import annotations

from pathlib import Path


def alive(pid: int) -> bool:
    """``pid`` runs (a zombie, exited but not yet reaped, does not count)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"
