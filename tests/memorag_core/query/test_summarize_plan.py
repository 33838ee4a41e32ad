"""The pieces of bulk summarization that need no model: the bounded reduce plan, prompt bounds, settings, the
summaries store (staging exactly once, publish, currency of stored summaries)."""

from __future__ import annotations

import hashlib

import pyarrow as pa
import pytest

from memorag_core.errors import InvalidInputError
from memorag_core.query.summarize import PROMPT_VERSION, SummarySettings, UnitSummarizer, content_groups, plan_reduce
from memorag_core.store import Manifest
from memorag_core.store.summaries import SummaryStore, content_key, units_digest


def keys(n: int, salt: str = "") -> list[str]:
    return [hashlib.sha256(f"{salt}{i}".encode()).hexdigest() for i in range(n)]


def test_reduce_plan_over_10000_units_is_a_bounded_tree():
    items = keys(10_000)
    root, nodes = plan_reduce(items, "collection", "s", 8)
    assert max(len(n.inputs) for n in nodes) <= 8 and min(len(n.inputs) for n in nodes) >= 2
    assert root == nodes[-1].key and nodes[-1].root_of == "collection"
    assert max(n.level for n in nodes) <= 10
    # every item and every node but the root is read exactly once
    read = [k for n in nodes for k in n.inputs]
    assert len(read) == len(set(read)) and set(read) == (set(items) | {n.key for n in nodes}) - {root}
    # bounded prompts: eight inputs of any length stay within reduce_max_chars (plus the template)
    s = SummarySettings(fan_in=8, reduce_max_chars=6000)
    prompt = UnitSummarizer(None, s).reduce_prompt(["x" * 50_000] * 8, "en")
    assert len(prompt) < 6000 + 200


def test_reduce_plan_changes_little_when_one_unit_is_added_or_removed():
    items = keys(2000)
    _, a = plan_reduce(items, "collection", "s", 8)
    _, b = plan_reduce(items[:1000] + [keys(1, "new")[0]] + items[1000:], "collection", "s", 8)
    _, c = plan_reduce(items[:1000] + items[1001:], "collection", "s", 8)
    ka, kb, kc = ({n.key for n in x} for x in (a, b, c))
    levels = max(n.level for n in a)
    assert len(kb - ka) <= 3 * levels and len(kc - ka) <= 3 * levels
    assert plan_reduce([], "t", "s", 8) == (None, [])
    assert plan_reduce(["k" * 64], "t", "s", 8) == ("k" * 64, [])
    # groups are cut by content, capped by fan-in
    groups = content_groups(items[:100], 8)
    assert sum(len(g) for g in groups) == 100 and max(len(g) for g in groups) <= 8


def test_settings_and_prompt_version():
    assert PROMPT_VERSION.startswith("p1-") and len(PROMPT_VERSION) == 15
    with pytest.raises(InvalidInputError, match="fan_in"):
        SummarySettings(fan_in=1)
    with pytest.raises(InvalidInputError, match="top_k"):
        SummarySettings(top_k=0)


def test_staging_is_exactly_once_and_stored_summaries_know_when_they_are_current(tmp_path):
    s = SummaryStore(str(tmp_path / "store"))
    k = content_key("unit", "u1", {"g": 1})
    assert s.staged("units", k) is None
    assert s.stage("units", k, {"unit_id": "u1", "summary": "first"}) is True
    assert s.stage("units", k, {"unit_id": "u1", "summary": "second"}) is False  # the first one stays
    assert s.staged("units", k)["summary"] == "first" and s.staged_keys("units") == [k]
    assert s.staged_many("units", [k, content_key("x")]) == {k: s.staged("units", k)}

    assert s.open("c") is None
    w = s.new_version("c")
    w.write_table("summaries", "units", pa.table({
        "unit_id": ["u1", "u2"], "summary": ["one", "two"], "key_points": [["a"], []], "model": ["m", "m"]}))
    w.write_table("summaries", "documents", pa.table({
        "unit_id": pa.array([None], pa.string()), "summary": ["doc d"], "key_points": pa.array([None],
                                                                                              pa.list_(pa.string())),
        "model": ["m"], "doc_id": ["d"], "unit_ids": [["u2", "u3"]]}))
    w.write_table("summaries", "collection", pa.table({
        "unit_id": pa.array([None], pa.string()), "summary": ["all"], "key_points": pa.array(
            [None], pa.list_(pa.string())), "model": ["m"]}))
    w.publish(Manifest(extra={"source_version": "v1", "source_units_sha256": units_digest(["u1", "u2", "u3"])}))
    stored = s.open("c")
    assert stored.source_version == "v1"
    assert stored.collection_summary(["u3", "u2", "u1"]) == "all"
    assert stored.collection_summary(["u1", "u2"]) is None  # other units: stale
    assert stored.document_summary("d", ["u3", "u2"], {}) == "doc d"
    assert stored.document_summary("d", ["u2"], {"u2": ["d"]}) == "two"  # alone in its unit: the unit summary
    assert stored.document_summary("e", ["u1"], {"u1": ["e", "f"]}) is None  # packed with others: none
    # the collections' own pointer is elsewhere
    assert s.store.current_version("c") is None and s.current_version("c") == stored.version


def test_gc_keeps_what_live_summaries_use(tmp_path):
    s = SummaryStore(str(tmp_path / "store"))
    old, new = content_key("old"), content_key("new")
    s.stage("units", old, {"summary": "o"})
    s.stage("units", new, {"summary": "n"})
    for keys_used in ([old], [new]):
        w = s.new_version("c")
        w.write_bytes("report.md", b"# r\n")
        w.publish(Manifest(extra={"staged_keys": keys_used}))
    first = s.versions.list_versions("c")[0]
    dry = s.gc("c", keep_last=1, min_age_s=0, dry_run=True)  # what would go; nothing goes
    assert s.staged_keys("units") == sorted([old, new]) and len(s.versions.list_versions("c")) == 2
    report = s.gc("c", keep_last=1, min_age_s=0)
    assert report == dry and report["freed_bytes"] > 0 and report["deferred"] is None
    assert {k: report[k] for k in ("removed_versions", "removed_staged", "versions", "staged")} == {
        "removed_versions": 1, "removed_staged": 1, "versions": [first], "staged": [f"units/{old}"]}
    assert s.staged_keys("units") == [new] and len(s.versions.list_versions("c")) == 1


def test_summaries_with_a_failed_reduce_are_not_current():
    """The job's "nothing to do" check: a version whose reduce failed is retried by the next run."""
    from types import SimpleNamespace

    from memorag_core.store.summaries import summaries_current

    def version(**extra):
        return SimpleNamespace(extra={"run_key": "r", **extra}, source_units_sha256="d")

    assert summaries_current(version(), "r", "d")
    assert not summaries_current(None, "r", "d")
    assert not summaries_current(version(), "other settings", "d") and not summaries_current(version(), "r", "x")
    assert not summaries_current(version(failed_reduce=["k"]), "r", "d")
    assert summaries_current(version(skipped={"u": "missing_memory"}), "r", "d")
    assert not summaries_current(version(skipped={"u": "missing_memory"}), "r", "d", retry_skipped=True)
