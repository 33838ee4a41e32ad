"""pipeline.cpu_pin: actors claim distinct cores through per-core locks, released when the process exits.

Every claim runs in a child process (pinning the test process would pin the rest of the test run).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.cpu_pin import claim_cpus

REPO = Path(__file__).resolve().parents[1]

CHILD = """
import json, os, sys, threading
from pipeline.cpu_pin import claim_cpus
seen = {}
go = threading.Event()
def early():  # a thread that exists before the claim must be pinned too
    go.wait()
    seen["thread"] = sorted(os.sched_getaffinity(0))
t = threading.Thread(target=early)
t.start()
got = claim_cpus(int(sys.argv[1]), sys.argv[2])
go.set()
t.join()
print(json.dumps({"got": got, "affinity": sorted(os.sched_getaffinity(0)), "thread": seen["thread"]}), flush=True)
sys.stdin.readline()
"""

pytestmark = pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="needs Linux CPU affinity")


class _Child:
    def __init__(self, n: int, lock_dir: Path):
        self.proc = subprocess.Popen([sys.executable, "-c", CHILD, str(n), str(lock_dir)], cwd=REPO,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        assert line, "child exited without reporting"
        self.report = json.loads(line)

    def exit(self) -> None:
        self.proc.stdin.close()
        assert self.proc.wait(timeout=30) == 0


def test_claims_are_distinct_exclusive_and_released_on_exit(tmp_path):
    allowed = sorted(os.sched_getaffinity(0))
    if len(allowed) < 2:
        pytest.skip("needs 2 cores")
    a = _Child(1, tmp_path)
    try:
        assert a.report["got"] == [allowed[0]]
        assert a.report["affinity"] == [allowed[0]] and a.report["thread"] == [allowed[0]]
        b = _Child(1, tmp_path)
        try:
            assert b.report["got"] == [allowed[1]] and b.report["affinity"] == [allowed[1]]
            # asking for every core while two are held: nothing pinned, affinity untouched
            c = _Child(len(allowed), tmp_path)
            assert c.report["got"] is None and c.report["affinity"] == allowed
            c.exit()
        finally:
            b.exit()
    finally:
        a.exit()
    # the kernel dropped a's lock with the process: the first core is free again
    d = _Child(1, tmp_path)
    assert d.report["got"] == [allowed[0]]
    d.exit()


def test_claim_rejects_non_positive_counts(tmp_path):
    with pytest.raises(ValueError, match="n must be >= 1"):
        claim_cpus(0, str(tmp_path))
