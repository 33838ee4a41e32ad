"""Who used the CPUs during a benchmark window: per-process CPU seconds, sampled, grouped by role.

On a 2-core machine the 2-actor rate is bounded by what the actors are left with: Ray's own processes (raylet,
GCS, log monitor, agents), Ray Data's helper actors (stats, actor locations, autoscaling coordinator), the driver
running the streaming executor, and anything else on the machine all take their share of the same two cores.
``CpuSampler`` samples ``psutil`` CPU times of every process every ``interval`` seconds in a background thread, so
that processes which exit before the end (Ray Data tears its actors down as soon as a dataset finishes) are still
counted up to their last sample; ``usage(start, end)`` gives the CPU seconds each group used inside a window and the
average number of cores that is.

    with CpuSampler() as sampler:
        ...                                   # the measured work
    sampler.usage(t_start, t_end)             # {"groups": {"actors": {"cpu_seconds": .., "cores": ..}, ..}, ..}

Times are wall-clock (``time.time()``), the clock the memory stage's rows carry.
"""

from __future__ import annotations

import os
import threading
import time

import psutil

# Ray Data's helper actors, by the process title Ray gives them ("ray::<ClassName>[.<method>]").
RAY_DATA_HELPERS = ("_StatsActor", "ActorLocationTracker", "_AutoscalingCoordinatorActor")
# Ray's own processes that carry no "ray::" title: binaries, and python services by script. Every other "ray::"
# process (idle workers, the dashboard and runtime-env agents) counts as a daemon by its title.
RAY_DAEMONS = ("raylet", "gcs_server", "log_monitor.py", "dashboard.py", "monitor.py", "agent.py")
GROUPS = ("actors", "driver", "ray_data_helpers", "ray_daemons", "other")


def classify(pid: int, name: str, cmdline: str, driver_pid: int, actor_marker: str = "MapWorker") -> str:
    """The role of one process: ``actors`` (Ray Data map workers, whose title contains ``actor_marker``),
    ``driver`` (``driver_pid``), ``ray_data_helpers``, ``ray_daemons`` or ``other`` (everything else on the
    machine, noisy neighbours included)."""
    if pid == driver_pid:
        return "driver"
    text = f"{name} {cmdline}"
    if text.lstrip().startswith("ray::") or " ray::" in text:
        if actor_marker in text:
            return "actors"
        if any(h in text for h in RAY_DATA_HELPERS):
            return "ray_data_helpers"
        return "ray_daemons"
    if any(d in text for d in RAY_DAEMONS) and "ray" in text:
        return "ray_daemons"
    return "other"


class CpuSampler:
    """Background sampler of every process's CPU time (user + system seconds).

    Args:
        interval: seconds between samples; each sample walks the process table (a few ms on a small machine).
        driver_pid: the process counted as ``driver`` (default: this one).
        actor_marker: substring of the actors' process title.
    """

    def __init__(self, interval: float = 1.0, driver_pid: int | None = None, actor_marker: str = "MapWorker"):
        if interval <= 0:
            raise ValueError(f"interval must be > 0 seconds, got {interval}")
        self.interval, self.actor_marker = interval, actor_marker
        self.driver_pid = os.getpid() if driver_pid is None else driver_pid
        self.samples: list[tuple[float, dict[int, float]]] = []
        self.roles: dict[int, str] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cpu-sampler", daemon=True)

    def sample(self) -> None:
        """Take one sample now (also called by the thread)."""
        cpu: dict[int, float] = {}
        for proc in psutil.process_iter(["pid", "name", "cmdline", "cpu_times"]):
            info = proc.info
            times = info.get("cpu_times")
            if times is None:  # exited or not ours to read
                continue
            pid = info["pid"]
            cpu[pid] = times.user + times.system
            # A Ray worker's title changes as it takes on a role; the last one seen wins.
            self.roles[pid] = classify(pid, info.get("name") or "", " ".join(info.get("cmdline") or []),
                                       self.driver_pid, self.actor_marker)
        self.samples.append((time.time(), cpu))

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def __enter__(self) -> "CpuSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()

    def pid_seconds(self, start: float, end: float) -> tuple[float, dict[int, float]]:
        """(covered seconds, CPU seconds per pid) between ``start`` and ``end`` (wall-clock), read off the first and
        last samples inside the window; a process first seen inside the window counts from zero (its start-up
        included), one that exited counts up to its last sample.

        Raises:
            ValueError: fewer than two samples inside the window, or ``end <= start``.
        """
        if end <= start:
            raise ValueError(f"window end {end} must be after start {start}")
        inside = [(t, cpu) for t, cpu in self.samples if start <= t <= end]
        if len(inside) < 2:
            raise ValueError(f"fewer than 2 CPU samples inside the {end - start:.1f} s window "
                             f"({len(self.samples)} samples in all): lower the interval")
        first_t, first = inside[0]
        last: dict[int, float] = {}
        for _, cpu in inside:
            last.update(cpu)
        used = {pid: cpu - first.get(pid, 0.0) for pid, cpu in last.items()}
        return inside[-1][0] - first_t, {pid: s for pid, s in used.items() if s > 0}

    def usage(self, start: float, end: float) -> dict:
        """CPU seconds and average cores per group between ``start`` and ``end`` (see ``pid_seconds``). Returns
        ``{"window_s", "groups": {group: {"cpu_seconds", "cores"}}, "total_cores"}``."""
        window, per_pid = self.pid_seconds(start, end)
        groups = {g: 0.0 for g in GROUPS}
        for pid, used in per_pid.items():
            groups[self.roles.get(pid, "other")] += used
        out = {g: {"cpu_seconds": round(s, 2), "cores": round(s / window, 3)} for g, s in groups.items()}
        return {"window_s": round(window, 2), "groups": out,
                "total_cores": round(sum(groups.values()) / window, 3)}
