"""Staged summary records are created exactly once, atomically, on a local folder and on S3."""

from __future__ import annotations

import threading

from memorag_core.store.summaries import SummaryStore, content_key


def test_racing_stage_calls_have_one_winner(backend):
    s = SummaryStore(backend.root_url, backend.storage_options)
    key = content_key("unit", "u1")
    n = 8
    barrier = threading.Barrier(n)
    wins: dict[int, bool] = {}

    def write(i: int) -> None:
        barrier.wait()
        wins[i] = s.stage("units", key, {"summary": f"writer {i}"})

    threads = [threading.Thread(target=write, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [i for i, won in wins.items() if won]
    assert len(wins) == n and len(winners) == 1
    assert s.staged("units", key)["summary"] == f"writer {winners[0]}"  # the winner's record, never replaced
    assert s.stage("units", key, {"summary": "late"}) is False and s.staged_keys("units") == [key]


def test_staged_many_reads_the_present_records_in_batches(backend):
    s = SummaryStore(backend.root_url, backend.storage_options)
    keys = [content_key("unit", f"u{i}") for i in range(5)]
    for i, k in enumerate(keys):
        s.stage("units", k, {"summary": f"s{i}"})
    ghost = content_key("unit", "ghost")
    got = s.staged_many("units", [ghost, *keys], batch=2)
    assert sorted(got) == sorted(keys) and {got[k]["summary"] for k in keys} == {f"s{i}" for i in range(5)}
    assert got[keys[0]] == s.staged("units", keys[0]) and s.staged_many("reduce", keys) == {}
