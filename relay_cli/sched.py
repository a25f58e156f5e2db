"""``--sched-slice-ms``: ask Linux's scheduler for a shorter time slice for this process.

Since Linux 6.12 (the EEVDF scheduler) an ordinary ``SCHED_OTHER`` task may name its own
slice, 0.1-100 ms, with ``sched_setattr(2)`` (``sched_attr.sched_runtime``); no privilege
is needed. A task with a shorter slice gets an earlier virtual deadline when it wakes, so
it preempts a longer-sliced task sooner: a node that shares its cores with busier
processes reads a pub/sub message sooner after Redis wrote it. The default slice is
0.7 ms * (1 + log2(CPUs)), e.g. 1.4 ms on 2 CPUs.

Older kernels accept the call and ignore the value; the slice read back with
``sched_getattr(2)`` tells the two apart. Nothing here is fatal: the caller logs a
refusal and the node runs with the kernel's slice. The slice is inherited on ``fork``.
"""

from __future__ import annotations

import ctypes
import os
import platform
import sys

__all__ = ["SliceRefused", "current_slice_ns", "request_slice"]

# (sched_setattr, sched_getattr) by machine; no libc wraps them before glibc 2.41.
_SYSCALLS = {
    "x86_64": (314, 315),
    "aarch64": (274, 275),
    "riscv64": (274, 275),
}
_FAIR_POLICIES = {0: "SCHED_OTHER", 3: "SCHED_BATCH"}
_RESET_ON_FORK = 0x01


class SliceRefused(Exception):
    """The slice could not be set: why, in words an operator can act on."""


class _SchedAttr(ctypes.Structure):
    """``struct sched_attr``, first version (SCHED_ATTR_SIZE_VER0, 48 bytes)."""

    _fields_ = [
        ("size", ctypes.c_uint32),
        ("sched_policy", ctypes.c_uint32),
        ("sched_flags", ctypes.c_uint64),
        ("sched_nice", ctypes.c_int32),
        ("sched_priority", ctypes.c_uint32),
        ("sched_runtime", ctypes.c_uint64),
        ("sched_deadline", ctypes.c_uint64),
        ("sched_period", ctypes.c_uint64),
    ]


def _syscalls() -> tuple[int, int]:
    if not sys.platform.startswith("linux"):
        raise SliceRefused(f"only Linux has sched_setattr (this is {sys.platform})")
    numbers = _SYSCALLS.get(platform.machine())
    if numbers is None:
        raise SliceRefused(f"sched_setattr's number on {platform.machine()} is not known here")
    return numbers


def _call(number: int, *args: object) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.syscall(number, *args) != 0:
        err = ctypes.get_errno()
        raise SliceRefused(f"the kernel refused: {os.strerror(err)} (errno {err})")


def _get(pid: int) -> _SchedAttr:
    attr = _SchedAttr()
    _call(_syscalls()[1], pid, ctypes.byref(attr), ctypes.sizeof(attr), 0)
    return attr


def current_slice_ns(pid: int = 0) -> int:
    """The slice of ``pid`` (0: this thread) in nanoseconds; 0 on a kernel without slices."""
    return int(_get(pid).sched_runtime)


def request_slice(ms: float) -> int:
    """Ask for a ``ms`` slice for this thread and the threads it starts later (0: the
    kernel's default); return the slice in force afterwards, in nanoseconds. Policy, nice
    and reset-on-fork are kept. The kernel clamps ``ms`` to 0.1-100.

    Raises :class:`SliceRefused` where the call does not exist or fails, for a real-time
    policy (its ``sched_runtime`` means something else), and when the kernel ignored it.
    """
    attr = _get(0)
    if attr.sched_policy not in _FAIR_POLICIES:
        raise SliceRefused(
            f"the process runs under scheduling policy {attr.sched_policy}, not SCHED_OTHER"
        )
    attr.size = ctypes.sizeof(attr)
    attr.sched_flags &= _RESET_ON_FORK
    attr.sched_runtime = round(ms * 1_000_000)
    _call(_syscalls()[0], 0, ctypes.byref(attr), 0)
    granted = current_slice_ns()
    if ms and granted != attr.sched_runtime:
        raise SliceRefused(
            f"the kernel kept a slice of {granted / 1e6:g} ms (custom slices need Linux 6.12+)"
        )
    return granted
