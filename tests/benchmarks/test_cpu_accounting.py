"""benchmarks/cpu_accounting.py: roles of processes and CPU seconds in a window, on real processes."""

import importlib.util
import os
import pathlib
import subprocess
import sys
import time

import pytest

_PATH = pathlib.Path(__file__).resolve().parents[2] / "benchmarks" / "cpu_accounting.py"
_spec = importlib.util.spec_from_file_location("cpu_accounting", _PATH)
cpu_accounting = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cpu_accounting)


@pytest.mark.parametrize("name, cmdline, role", [
    ("ray::MapWorker(MapBatches(TimedMemoryStage))", "ray::MapWorker(MapBatches(TimedMemoryStage))", "actors"),
    ("ray::MapWorker(MapBatches(X)).submit", "", "actors"),
    ("ray::_StatsActor", "ray::_StatsActor.update_execution_metrics", "ray_data_helpers"),
    ("ray::ActorLocationTracker", "", "ray_data_helpers"),
    ("ray::DashboardAgent", "ray::DashboardAgent", "ray_daemons"),
    ("ray::IDLE", "ray::IDLE", "ray_daemons"),
    ("raylet", "/venv/lib/python3.11/site-packages/ray/core/src/ray/raylet/raylet --raylet_socket_name=x", "ray_daemons"),
    ("python", "/venv/bin/python -u /venv/lib/python3.11/site-packages/ray/_private/log_monitor.py", "ray_daemons"),
    ("python", "python -m jobs.evaluate --dataset x", "other"),
    ("kdamond.0", "", "other"),
])
def test_classify_roles(name, cmdline, role):
    assert cpu_accounting.classify(4242, name, cmdline, driver_pid=1) == role


def test_classify_driver_by_pid():
    assert cpu_accounting.classify(7, "python", "python bench.py", driver_pid=7) == "driver"


def test_counts_a_process_that_exited_inside_the_window():
    """A child that burns ~1 CPU second and exits before the window ends is still counted (up to its last
    sample), in ``other``; the window's own bounds are respected."""
    with cpu_accounting.CpuSampler(interval=0.05) as sampler:
        time.sleep(0.2)
        start = time.time()
        child = subprocess.Popen([sys.executable, "-c",
                                  "import time\nt=time.process_time()\nwhile time.process_time()-t<1.0: pass"])
        child.wait(timeout=60)
        time.sleep(0.3)
        end = time.time()
        time.sleep(0.2)
    window, per_pid = sampler.pid_seconds(start, end)
    assert window <= end - start + 1e-6
    # its last sample is at most one interval before it exited: >= 1.0 - (interval + scheduling slack) seconds
    assert 0.6 <= per_pid[child.pid] <= 1.5, per_pid[child.pid]
    usage = sampler.usage(start, end)
    assert set(usage["groups"]) == set(cpu_accounting.GROUPS)
    # the child is in "other", with whatever else ran on the machine meanwhile
    assert usage["groups"]["other"]["cpu_seconds"] >= round(per_pid[child.pid], 2) - 0.01
    assert child.pid in sampler.roles and sampler.roles[child.pid] == "other"
    assert sampler.roles[os.getpid()] == "driver"


def test_usage_rejects_bad_windows():
    sampler = cpu_accounting.CpuSampler(interval=0.5)
    sampler.sample()
    now = time.time()
    with pytest.raises(ValueError, match="must be after start"):
        sampler.usage(now, now - 1)
    with pytest.raises(ValueError, match="fewer than 2 CPU samples"):
        sampler.usage(now - 10, now + 10)
    with pytest.raises(ValueError, match="interval must be > 0"):
        cpu_accounting.CpuSampler(interval=0)
