"""Session and user memories (memorag_core/query/sessions.py): storage, bounds, folding, ownership, chat
histories, with the tiny random Llama (mechanics; its text is noise) and no Ray."""

from __future__ import annotations

import json

import pytest
import torch

from memorag_core.errors import ArtifactNotFoundError, InvalidInputError, PayloadTooLargeError
from memorag_core.query.sessions import (
    Conversations,
    SessionConfig,
    SessionStore,
    chat_session_id,
    fold_oldest,
    history_turns,
    owner_of,
)

OWNER = owner_of("mrg_key_one", "facts")
OTHER = owner_of("mrg_key_two", "facts")


class Clock:
    def __init__(self) -> None:
        self.t = 1_000_000.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture(scope="module")
def tiny_memory(tiny_lm_dir):
    from memorag_core.memory import MemoryConfig, build_memory

    return build_memory(MemoryConfig(model=str(tiny_lm_dir), load={"device": "cpu"}))


def make(tmp_path, tiny_memory, **cfg):
    clock = Clock()
    config = SessionConfig(**{"standalone_tokens": 6, "recall_tokens": 6, **cfg})
    store = SessionStore(str(tmp_path / "store"), config=config, clock=clock)
    return Conversations(store, lambda name: tiny_memory), store, clock


def test_ids_are_validated():
    from memorag_core.query.sessions import check_session_id, check_user_id

    for bad in ["short", "../../etc/passwd-x", "a" * 65, "has space in it", None, 12345678]:
        with pytest.raises(InvalidInputError, match="session id"):
            check_session_id(bad)
    for bad in ["", "../x", "-leading", "a" * 65, None]:
        with pytest.raises(InvalidInputError, match="user id"):
            check_user_id(bad)
    assert check_session_id("abcdEFGH_-12") and check_user_id("alice@example.org")


def test_session_belongs_to_one_key_one_collection_and_expires(tmp_path, tiny_memory):
    conv, store, clock = make(tmp_path, tiny_memory, ttl_s=60)
    s = store.create("facts", OWNER)
    assert store.get("session", s.id, OWNER, "facts").id == s.id
    for owner, coll in [(OTHER, "facts"), (OWNER, "other"), (owner_of(None, "facts"), "facts")]:
        with pytest.raises(ArtifactNotFoundError, match="does not exist or has expired"):
            store.get("session", s.id, owner, coll)
    with pytest.raises(ArtifactNotFoundError):
        conv.prepare("other", OWNER, "what?", session_id=s.id)  # never reads another collection's session
    with pytest.raises(ArtifactNotFoundError):
        store.delete("session", s.id, OTHER)  # another key cannot delete it either
    with pytest.raises(ArtifactNotFoundError):
        store.get("session", "NoSuchSession1", OWNER)
    clock.t += 61
    with pytest.raises(ArtifactNotFoundError, match="expired"):
        conv.prepare("facts", OWNER, "what?", session_id=s.id)
    assert [x.id for x in store.expired_sessions()] == [s.id]
    assert store.delete("session", s.id, OWNER).id == s.id  # an expired session can still be deleted
    with pytest.raises(ArtifactNotFoundError):
        store.get("session", s.id, OWNER, allow_expired=True)


def test_turns_grow_by_append_fold_oldest_and_survive_a_restart(tmp_path, tiny_memory):
    conv, store, clock = make(tmp_path, tiny_memory, max_turns=2)
    s = store.create("facts", OWNER)
    first = conv.prepare("facts", OWNER, "Who built the lighthouse?", session_id=s.id)
    assert first.turn == 1 and first.standalone is None and first.queries() == []  # nothing to read yet
    raw = []
    for i in range(3):
        state = conv.record("facts", OWNER, s.id, f"Question {i} about Elsa Brandt?", f"Answer {i}.", ["lighthouse"])
        raw.append(conv.memory_for("facts").stats.raw_tokens)
    assert raw[1] > raw[0]  # each turn appended to the memory that was loaded, not re-read
    assert state.turn_count == 3 and state.folded == 1 and [t.n for t in state.turns] == [2, 3]
    assert all(t.entries > 0 for t in state.turns) and state.prefix_entries > 0
    on_disk = json.loads((tmp_path / "store" / "tenants" / OWNER[:32] / "sessions" / s.id / "state.json").read_text())
    assert on_disk["turn_count"] == 3 and on_disk["owner"] == OWNER and "mrg_key_one" not in json.dumps(on_disk)
    m = store.read_memory(state)
    assert m.header["entries"] == state.prefix_entries + sum(t.entries for t in state.turns)
    assert m.keys[0].shape[1] == m.header["entries"]
    # A new process (replica restart) reads the same session and writes clues after its memory.
    conv2 = Conversations(SessionStore(str(tmp_path / "store"), config=store.config, clock=clock),
                          lambda name: tiny_memory)
    ctx = conv2.prepare("facts", OWNER, "When was she born?", session_id=s.id)
    assert ctx.turn == 4 and ctx.seconds > 0
    assert all(src == "session" for src, _ in ctx.queries())
    public = store.get("session", s.id, OWNER).public()
    assert [t["question"] for t in public["turns"]] == ["Question 1 about Elsa Brandt?", "Question 2 about Elsa "
                                                                                           "Brandt?"]
    assert "owner" not in public


def test_fold_slices_entries_and_rerotates_the_rest(tmp_path, tiny_memory):
    from memorag_core.query.sessions import ConversationState, Turn

    conv, store, _ = make(tmp_path, tiny_memory)
    state = ConversationState("abcdefgh", "session", "facts", OWNER)
    mem = conv.memory_for("facts")
    mem.reset()
    for i, text in enumerate(["The first turn talks about lighthouses and oil lamps.",
                              "The second turn is about an orchard with forty kinds of apple.",
                              "The third turn is about a railway."]):
        conv._append(mem, state, Turn(f"q{i}", n=i + 1), text + "\n")
    before = mem.export()
    p, drop = state.prefix_entries, state.turns[0].entries
    after = fold_oldest(mem, before, state, 1)
    assert state.folded == 1 and len(state.turns) == 2
    assert after.header["entries"] == before.header["entries"] - drop
    assert after.header["next_position"] == before.header["next_position"] - drop
    for i, (k0, v0, k1, v1) in enumerate(zip(before.keys, before.values, after.keys, after.values)):
        assert torch.equal(k1[:, :p], k0[:, :p]) and torch.equal(v1[:, :p], v0[:, :p])  # preamble untouched
        assert torch.equal(v1[:, p:], v0[:, p + drop:])  # values carry no position
        d = torch.full((1, k1.shape[0], k1.shape[1] - p), drop, dtype=torch.long)  # (1, kv_heads, n)
        back = mem._rerotate(k1[None, :, p:], d, layer_idx=i)[0]  # re-rotating forward again gives the stored keys
        torch.testing.assert_close(back, k0[:, p + drop:], atol=1e-4, rtol=1e-4)
    mem.import_tensors(after)  # the folded memory loads and decodes
    assert mem.generate("Say something about {question}", "apples", max_new_tokens=3)


def test_bytes_bound_folds_until_under(tmp_path, tiny_memory):
    conv, store, _ = make(tmp_path, tiny_memory, max_turns=50, max_bytes=60_000)
    s = store.create("facts", OWNER)
    for i in range(4):
        state = conv.record("facts", OWNER, s.id, f"A fairly long question number {i} " * 3, "An answer " * 10, [])
    assert state.folded >= 1 and len(state.turns) >= 1
    assert store.read_memory(state).nbytes <= 60_000 or len(state.turns) == 1


def test_user_memory_grows_every_n_turns_and_when_a_session_ends(tmp_path, tiny_memory):
    conv, store, _ = make(tmp_path, tiny_memory, user_every=2)
    s = store.create("facts", OWNER, user_id="alice")
    conv.record("facts", OWNER, s.id, "I love baking bread. Where is a bakery?", "Linden Street.", ["bakery"])
    assert store.get("user", "alice", OWNER) is None
    conv.record("facts", OWNER, s.id, "When does it open?", "At eight.", ["bakery"])
    u = store.get("user", "alice", OWNER)
    assert u.turn_count == 1 and "I love baking bread" in u.turns[0].question and u.turns[0].titles == ["bakery"]
    conv.record("facts", OWNER, s.id, "And on Sundays?", "Closed.", [])
    conv.end(s.id, OWNER)  # the third turn reaches the user memory when the session ends
    assert store.get("user", "alice", OWNER).turn_count == 2
    with pytest.raises(ArtifactNotFoundError):
        store.get("session", s.id, OWNER)
    # A later session of the same user reads the user memory; another key's user "alice" is someone else.
    ctx = conv.prepare("facts", OWNER, "Where should I go this weekend?", user_id="alice")
    assert {src for src, _ in ctx.queries()} <= {"user", "user_recall"}
    # the request's attention over the user memory points at records of what this user asked (best first, at
    # most user_pointed, none below the records' mean)
    records = [" ".join(t.question.split()) for t in store.get("user", "alice", OWNER).turns]
    assert 1 <= len(ctx.user_pointed) <= 2 and set(ctx.user_pointed) <= set(records), ctx.user_pointed
    assert [q for src, q in ctx.queries() if src == "user"] == ctx.user_pointed
    assert store.get("user", "alice", OTHER) is None
    with pytest.raises(ArtifactNotFoundError):
        store.delete("user", "alice", OTHER)
    store.delete("user", "alice", OWNER)
    assert store.get("user", "alice", OWNER) is None


def test_chat_history_appends_only_new_turns(tmp_path, tiny_memory):
    conv, store, _ = make(tmp_path, tiny_memory)
    msgs = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Who built the lighthouse?"},
            {"role": "assistant", "content": "Elsa Brandt."},
            {"role": "user", "content": "When?"}]
    sid, last = conv.sync_history("facts", OWNER, msgs)
    assert last == "When?" and sid == chat_session_id(OWNER, "facts", "Who built the lighthouse?")
    assert store.get("session", sid, OWNER).turn_count == 1
    raw = conv.memory_for("facts").stats.raw_tokens
    msgs += [{"role": "assistant", "content": "In 1843."}, {"role": "user", "content": "And the lamp?"}]
    sid2, last = conv.sync_history("facts", OWNER, msgs)
    state = store.get("session", sid2, OWNER)
    assert sid2 == sid and state.turn_count == 2 and last == "And the lamp?"
    assert conv.memory_for("facts").stats.raw_tokens > raw  # appended after the loaded memory
    edited = msgs[:2] + [{"role": "assistant", "content": "Somebody else."}] + msgs[3:]
    sid3, _ = conv.sync_history("facts", OWNER, edited)
    assert sid3 == sid and [t.answer for t in store.get("session", sid3, OWNER).turns] == ["Somebody else.",
                                                                                          "In 1843."]
    assert conv.sync_history("facts", OWNER, [{"role": "user", "content": "Hi there"}]) == ("", "Hi there")


def test_history_bounds_and_shape():
    cfg = SessionConfig(max_history_messages=4, max_history_chars=100)
    with pytest.raises(PayloadTooLargeError, match="messages"):
        history_turns([{"role": "user", "content": "x"}] * 5, cfg)
    with pytest.raises(PayloadTooLargeError, match="characters"):
        history_turns([{"role": "user", "content": "x" * 101}], cfg)
    with pytest.raises(InvalidInputError, match="last message"):
        history_turns([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], cfg)
    with pytest.raises(InvalidInputError, match=r"messages\[0\]"):
        history_turns([{"role": "robot", "content": "q"}], cfg)


def test_query_request_validates_session_fields():
    from memorag_core.query import QueryRequest

    QueryRequest("q", session_id="abcdefgh1", user_id="bob").validate()
    with pytest.raises(InvalidInputError, match="session id"):
        QueryRequest("q", session_id="../x").validate()
    with pytest.raises(InvalidInputError, match="summarize"):
        QueryRequest(None, task="summarize", user_id="bob").validate()


def test_generated_lines_drop_prompt_echoes_and_labels():
    from memorag_core.query.sessions import RECALL_PROMPT, _lines

    echo = RECALL_PROMPT.replace("{question}", " ") + " I have read the whole text. What is the task?"
    text = ("I have read the whole text.\n- Jörgen Smit\n2. Question: When was Jörgen Smit born?\n"
            "Write only the names, one per line.\n- Jörgen Smit\n")
    assert _lines(text, echo_of=echo) == ["Jörgen Smit", "When was Jörgen Smit born?"]
    assert _lines("a\n\n--\n", echo_of=echo) == []
    assert _lines("I have read the text. What is the task?", echo_of=echo) == []  # paraphrased echo
    assert _lines("When did Elsa Brandt build it?", echo_of=echo) == ["When did Elsa Brandt build it?"]


def _store_bytes(root) -> list[tuple[str, bytes]]:
    return [(str(p.relative_to(root)), p.read_bytes()) for p in sorted(root.rglob("*")) if p.is_file()]


def test_deleting_a_user_deletes_every_session_and_memory_that_names_them(tmp_path, tiny_memory, caplog):
    """Every object left in the store after the delete is read: neither the user id nor any of their questions
    is there, another user's session is untouched, and no log line names the user."""
    import logging

    caplog.set_level(logging.DEBUG)
    conv, store, _ = make(tmp_path, tiny_memory, user_every=1)
    uid, questions = "alice.smith@example.org", ["Where is the Varnholm lighthouse?", "Who built the mill?"]
    s1 = store.create("facts", OWNER, user_id=uid)
    conv.record("facts", OWNER, s1.id, questions[0], "On the cape.", ["lighthouse"])  # user memory grows
    s2 = store.create("facts", OWNER, user_id=uid)
    conv.record("facts", OWNER, s2.id, questions[1], "A miller.", [])
    chat = [{"role": "user", "content": "Tell me about the orchard?"}, {"role": "assistant", "content": "Old."},
            {"role": "user", "content": "How old?"}]
    sid_chat, _ = conv.sync_history("facts", OWNER, chat, uid)
    questions.append("Tell me about the orchard?")
    bob = store.create("facts", OWNER, user_id="bob")
    conv.record("facts", OWNER, bob.id, "What does the cider press run on?", "Water.", [])
    assert store.get("user", uid, OWNER).turn_count >= 2
    root = tmp_path / "store"
    assert any(uid.encode() in data for _, data in _store_bytes(root))
    assert not any(uid in path for path, _ in _store_bytes(root))  # no path names a user, even before
    out = conv.delete_user(OWNER, uid)
    assert out["sessions"] == 3 and out["records"] >= 2
    for path, data in _store_bytes(root):
        assert uid.encode() not in data, path
        assert not any(q.encode() in data for q in questions), path
    assert store.get("session", bob.id, OWNER).user_id == "bob"  # another user of the same key is untouched
    for sid in (s1.id, s2.id, sid_chat):
        with pytest.raises(ArtifactNotFoundError):
            conv.record("facts", OWNER, sid, "Still there?", "No.", [])  # nothing in flight recreates them
    assert store.get("user", uid, OWNER) is None
    with pytest.raises(ArtifactNotFoundError):
        conv.delete_user(OWNER, uid)
    assert not any(uid in r.getMessage() for r in caplog.records)


def test_quota_of_sessions_per_owner_is_a_clear_error(tmp_path, tiny_memory):
    from memorag_core.errors import QuotaExceededError

    conv, store, _ = make(tmp_path, tiny_memory, max_sessions_per_owner=2)
    a, _ = store.create("facts", OWNER), store.create("facts", OWNER)
    with pytest.raises(QuotaExceededError, match="2 sessions, its quota is 2"):
        store.create("facts", OWNER)
    store.create("facts", OTHER)  # another owner has its own quota
    conv.end(a.id, OWNER)
    store.create("facts", OWNER)
    conv, store, _ = make(tmp_path / "b", tiny_memory, max_bytes_per_owner=1000)
    s = store.create("facts", OWNER)
    conv.record("facts", OWNER, s.id, "A question that makes a memory file?", "Yes.", [])
    with pytest.raises(QuotaExceededError, match="bytes"):
        store.create("facts", OWNER)


def test_sweep_ends_expired_sessions_and_deletes_expired_user_memories(tmp_path, tiny_memory):
    conv, store, clock = make(tmp_path, tiny_memory, ttl_s=60, user_ttl_s=600, user_every=1)
    s = store.create("facts", OWNER, user_id="carol")
    conv.record("facts", OWNER, s.id, "Which bakery opens first?", "Linden Street.", ["bakery"])
    clock.t += 61
    assert conv.sweep(min_interval_s=0) == 1
    assert store.get("user", "carol", OWNER) is not None
    clock.t += 600
    conv.sweep(min_interval_s=0)
    assert store.get("user", "carol", OWNER, allow_expired=True) is None
    assert not any(b"Which bakery" in data for _, data in _store_bytes(tmp_path / "store"))


def test_a_turn_reads_its_session_memory_file_once(tmp_path, tiny_memory):
    conv, store, clock = make(tmp_path, tiny_memory)
    s = store.create("facts", OWNER)
    conv.record("facts", OWNER, s.id, "Who built the lighthouse?", "Elsa Brandt.", [])
    fresh = SessionStore(str(tmp_path / "store"), config=store.config, clock=clock)  # another replica
    conv2 = Conversations(fresh, lambda name: tiny_memory)
    conv2.prepare("facts", OWNER, "When?", session_id=s.id)
    conv2.record("facts", OWNER, s.id, "When?", "In 1843.", [])
    assert fresh.memory_reads == 1  # prepare read it; record used the same bytes (checksum-matched)
    conv2.prepare("facts", OWNER, "And then?", session_id=s.id)
    assert fresh.memory_reads == 1  # the file it wrote itself is not read back


def test_chat_sessions_of_two_users_behind_one_key_do_not_collide(tmp_path, tiny_memory):
    conv, store, _ = make(tmp_path, tiny_memory)
    opening = [{"role": "user", "content": "Who built the lighthouse?"}]
    a = opening + [{"role": "assistant", "content": "Elsa Brandt."}, {"role": "user", "content": "When?"}]
    b = opening + [{"role": "assistant", "content": "Nobody knows."}, {"role": "user", "content": "Why?"}]
    sa, _ = conv.sync_history("facts", OWNER, a, "ann")
    sb, _ = conv.sync_history("facts", OWNER, b, "ben")
    assert sa != sb
    assert chat_session_id(OWNER, "facts", "q", "ann") != chat_session_id(OWNER, "facts", "q", "ben")
    sa2, _ = conv.sync_history("facts", OWNER, a + [{"role": "assistant", "content": "1843."},
                                                    {"role": "user", "content": "Why?"}], "ann")
    assert sa2 == sa and store.get("session", sa, OWNER).turn_count == 2  # ann's turns were not wiped by ben
    assert [t.answer for t in store.get("session", sb, OWNER).turns] == ["Nobody knows."]
