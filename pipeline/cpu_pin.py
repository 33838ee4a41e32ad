"""Give each CPU memory actor cores of its own.

Ray reserves CPUs by count but does not pin processes to cores, so the kernel moves single-threaded torch actors
between cores and their warm L1/L2 caches go with it. On the 2-core test machine two unpinned memory processes
reached 1.80x the tokens/s of one, pinned ones 1.97x (benchmarks/bench_memorize_actors.py has the Ray figures).

An actor claims cores with one ``flock`` per core in a per-machine lock folder: free cores are taken in order, and
the locks live as long as the process (the kernel drops them when an actor dies, so a restarted actor finds its
cores free again). Nothing is pinned when fewer cores are free than asked for, so oversubscribed nodes run as
before.
"""

from __future__ import annotations

import fcntl
import logging
import os
import tempfile

logger = logging.getLogger(__name__)

_HELD: list[int] = []  # lock file descriptors held for the life of the process


def _lock_dir() -> str:
    return os.environ.get("MEMORAG_CPU_LOCK_DIR") or os.path.join(tempfile.gettempdir(), "memorag-cpu-locks")


def claim_cpus(n: int, lock_dir: str | None = None) -> list[int] | None:
    """Pin every thread of this process to ``n`` cores no other claimant on the machine holds.

    Returns the cores, or ``None`` (nothing pinned) when fewer than ``n`` are free or the platform cannot pin.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if not hasattr(os, "sched_setaffinity"):  # pragma: no cover - macOS / Windows
        return None
    folder = lock_dir or _lock_dir()
    os.makedirs(folder, exist_ok=True)
    got: list[int] = []
    fds: list[int] = []
    for cpu in sorted(os.sched_getaffinity(0)):
        fd = os.open(os.path.join(folder, f"cpu{cpu}.lock"), os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        got.append(cpu)
        fds.append(fd)
        if len(got) == n:
            break
    if len(got) < n:
        for fd in fds:
            os.close(fd)
        logger.info("cpu pinning: %d of %d cores free, not pinned", len(got), n)
        return None
    # every thread: Ray's worker threads exist already, and the one running the actor's methods may not be this one
    for tid in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(tid), got)
        except OSError:  # a thread that exited meanwhile
            pass
    _HELD.extend(fds)
    logger.info("cpu pinning: process %d pinned to cores %s", os.getpid(), got)
    return got
