"""Does a session memory help a follow-up find its evidence? Two-turn dialogues built from HotpotQA, measured.

The builder (:func:`build_dialogues`), its rules:

1. A question qualifies when exactly one of its two supporting titles (parenthetical stripped, e.g. ``Kiss and
   Tell (1945 film)`` -> ``Kiss and Tell``) occurs verbatim in it (case-insensitive): that title is the entity E
   the follow-up will leave out. Questions that name both or neither are skipped.
2. Turn 1 asks about E: ``Tell me about E.`` Its answer is the first two sentences of E's paragraph (an oracle
   answer standing in for the generator, so that every condition sees the same conversation); its cited titles
   are turn 1's own top-3 retrieved titles.
3. Turn 2 is the HotpotQA question with E replaced by a reference: ``the (...) film E`` (a determiner, up to four
   words, and a lower-case noun right before E) -> ``that film``; ``the E`` -> ``it``; otherwise a pronoun:
   possessive (``E's``) -> his/her/its, after a preposition or a past participle -> him/her/it, else he/she/it.
   Person or thing: a person when the first sentence of E's paragraph reads like a person's (a birth date, "is
   an American actor", ...), then she/her when the paragraph uses she/her/hers more than he/his/him, else he;
   a thing: it.
4. Turn 2's gold: both supporting paragraphs of the question.

The corpus: every context paragraph (10 per question, distractors included) of the dialogues, pooled and
deduplicated by title, embedded with the embedded all-MiniLM-L6-v2; passages are whole paragraphs
(``title: text``). Conditions for turn 2 (recall@k of its two gold paragraphs, averaged over dialogues):

* ``question``: turn 2 alone (the follow-up without context);
* ``history``: turn 1's question and answer pasted before turn 2, as one query (the usual chat-RAG fallback);
* ``session``: turn 2 plus the session memory's queries (standalone question and recalls, source ``session``),
  fused by :func:`memorag_core.retrieval.fusion.fuse` with the default weights, exactly as the query engine does;
* ``standalone``: the session memory's standalone question alone (turn 2 when it wrote none).

The session memory is the real :class:`memorag_core.query.sessions.Conversations` on the embedded
SmolLM2-135M-Instruct (compressed KV, the default :class:`SessionConfig` compression; at most 32 tokens of
standalone question and 24 of recalls, flags): turn 1 is recorded (appended), then
:meth:`Conversations.prepare` writes the standalone question and recalls for turn 2. Resumable: each dialogue's
generations go to ``dialogues.jsonl`` in ``--out`` as they finish, and a rerun skips them. ::

    python benchmarks/bench_sessions.py --n 50 --out runs/sessions
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "hotpotqa_dev_300.jsonl"
_PREP = {"of", "by", "with", "for", "to", "from", "in", "about", "on", "at", "than", "as", "featuring", "starring",
         "into", "over", "under", "between", "against", "behind", "before", "after", "via", "like"}
_NOUNS = {"film", "album", "band", "song", "novel", "book", "series", "show", "game", "company", "magazine",
          "newspaper", "university", "city", "town", "group", "team", "club", "movie", "play", "opera", "musical",
          "station", "network", "brand", "airline", "school", "college", "river", "island", "county", "village",
          "singer", "actor", "actress", "author", "writer", "director", "producer", "player", "musician",
          "composer", "artist", "poet", "politician", "sitcom", "episode", "anthology", "comedy", "drama",
          "documentary", "franchise", "character", "restaurant", "hotel", "stadium", "building", "museum", "ship",
          "car", "rapper", "duo", "trio", "ballet", "publication", "region", "country", "state", "program",
          "project", "special", "video", "event", "award", "festival", "tour", "record", "label", "party",
          "organization", "tournament", "race", "championship", "competition", "league", "sport", "language"}
_PERSON = re.compile(r"\(born|\(\d{1,2} \w+ \d{4}|\(\w+ \d{1,2}, \d{4}|\b(?:is|was) an? [A-Za-z ,-]*?(?:actor|actress|"
                     r"singer|player|politician|writer|author|director|footballer|boxer|musician|rapper|producer|"
                     r"composer|artist|poet|journalist|businessman|businesswoman|wrestler|coach|athlete|model|"
                     r"comedian|engineer|scientist|philosopher|king|queen|prince|princess|officer|judge|lawyer|"
                     r"teacher|dancer|painter|entrepreneur|presenter|personality|guitarist|drummer|pianist|"
                     r"screenwriter|novelist|architect|economist|historian|activist|soldier|general|cyclist|"
                     r"swimmer|skater|golfer|anthroposophist|leader|member|manager|chef|designer)\b")


def strip_title(title: str) -> str:
    """``Kiss and Tell (1945 film)`` -> ``Kiss and Tell``."""
    return re.sub(r"\s*\([^)]*\)\s*$", "", title).strip()


def paragraph(row: dict, title: str) -> str:
    i = row["context"]["title"].index(title)
    return "".join(row["context"]["sentences"][i]).strip()


def _gender(text: str) -> str | None:
    """``m``/``f`` when the paragraph's first sentence reads like a person's (birth date, "is an American
    actor", ...) and it uses he/his/him or she/her/hers more than the other; None otherwise (a thing: it)."""
    first = re.split(r"(?<=[.!?])\s", text.strip(), maxsplit=1)[0]
    if not _PERSON.search(first):
        return None
    words = re.findall(r"[a-z]+", text.lower())
    he = sum(w in ("he", "his", "him") for w in words)
    she = sum(w in ("she", "her", "hers") for w in words)
    return "f" if she > he else "m"


def refer(question: str, entity: str, para: str) -> str | None:
    """``question`` with ``entity`` replaced by a reference (rule 3 of the module docstring); None if absent."""
    m = re.search(r"(\"?)" + re.escape(entity) + r"(\"?)('s)?", question, flags=re.IGNORECASE)
    if m is None:
        return None
    before = question[:m.start()]
    det = re.search(r"\b(the|a|an)((?:\s+[A-Za-z'-]+){0,4}?)\s+([a-z]+)\s*$", before, flags=re.IGNORECASE)
    noun = det.group(3) if det else ""
    if det and not m.group(3) and noun.lower() in _NOUNS:
        ref = f"that {noun}"
        start = det.start()
    elif re.search(r"\b(the|a|an)\s*$", before, flags=re.IGNORECASE) and not m.group(3):
        ref = "it"
        start = re.search(r"\b(the|a|an)\s*$", before, flags=re.IGNORECASE).start()
    else:
        g = _gender(para)
        prev = (re.findall(r"[A-Za-z]+", before) or [""])[-1].lower()
        if m.group(3):
            ref = {"m": "his", "f": "her"}.get(g, "its")
        elif prev in _PREP or (prev.endswith("ed") and prev not in ("was", "were")):
            ref = {"m": "him", "f": "her"}.get(g, "it")
        else:
            ref = {"m": "he", "f": "she"}.get(g, "it")
        start = m.start()
    out = question[:start] + ref + question[m.end():]
    if start == 0:
        out = out[0].upper() + out[1:]
    return re.sub(r"\s+", " ", out).strip()


def build_dialogues(rows: list[dict], n: int | None = None) -> list[dict]:
    """Two-turn dialogues from HotpotQA rows (rules 1-4 of the module docstring), in file order, at most ``n``."""
    out = []
    for row in rows:
        titles = list(dict.fromkeys(row["supporting_facts"]["title"]))
        if len(titles) != 2:
            continue
        named = [t for t in titles if strip_title(t) and strip_title(t).lower() in row["question"].lower()]
        if len(named) != 1 or strip_title(titles[0]).lower() == strip_title(titles[1]).lower():
            continue
        entity_title = named[0]
        entity = strip_title(entity_title)
        para = paragraph(row, entity_title)
        turn2 = refer(row["question"], entity, para)
        if not turn2 or entity.lower() in turn2.lower():
            continue
        sentences = [s.strip() for s in row["context"]["sentences"][row["context"]["title"].index(entity_title)]]
        out.append({"id": row["id"], "entity": entity, "entity_title": entity_title,
                    "turn1": f"Tell me about {entity}.", "answer1": " ".join(sentences[:2]),
                    "turn2": turn2, "original": row["question"], "gold": titles, "type": row["type"]})
        if n is not None and len(out) >= n:
            break
    return out


def pooled_corpus(rows: list[dict], ids: set[str]) -> tuple[list[str], list[str]]:
    """(titles, passages) of every context paragraph of the rows in ``ids``, deduplicated by title."""
    seen: dict[str, str] = {}
    for row in rows:
        if row["id"] not in ids:
            continue
        for t, sents in zip(row["context"]["title"], row["context"]["sentences"]):
            seen.setdefault(t, f"{t}: {''.join(sents).strip()}")
    return list(seen), list(seen.values())


def recall_at(ranked: list[str], gold: list[str], k: int) -> float:
    return sum(g in ranked[:k] for g in gold) / len(gold)


def main(argv: list[str] | None = None) -> int:
    import numpy as np

    from memorag_core.memory import MemoryConfig, build_memory
    from memorag_core.query.sessions import Conversations, SessionConfig, SessionStore, owner_of
    from memorag_core.retrieval import EmbedderConfig, load_embedder
    from memorag_core.retrieval.fusion import FusionConfig, Ranking, fuse

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--n", type=int, default=50, help="dialogues (first n that the builder accepts)")
    ap.add_argument("--out", default="runs/sessions")
    ap.add_argument("--ks", default="2,5,10")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    ap.add_argument("--report-only", action="store_true", help="no new dialogues: the table over those done")
    ap.add_argument("--standalone-tokens", type=int, default=32, help="most tokens of the standalone question")
    ap.add_argument("--recall-tokens", type=int, default=24, help="most tokens of the recalls")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = [json.loads(line) for line in Path(args.data).read_text().splitlines() if line.strip()]
    dialogues = build_dialogues(rows, args.n)
    (out / "built.jsonl").write_text("".join(json.dumps(d) + "\n" for d in dialogues))
    titles, passages = pooled_corpus(rows, {d["id"] for d in dialogues})
    embedder = load_embedder(EmbedderConfig(model=None, device="cpu"))
    cache = out / "corpus.npz"
    if cache.exists() and list(np.load(cache, allow_pickle=False)["titles"]) == titles:
        pv = np.load(cache, allow_pickle=False)["vecs"]
    else:
        t0 = time.perf_counter()
        pv = embedder.encode(passages)  # (passages, dim)
        np.savez(cache, titles=np.array(titles), vecs=pv)
        print(f"embedded {len(passages)} passages in {time.perf_counter() - t0:.0f} s", flush=True)

    def rank(queries: list[str]) -> list[list[str]]:
        qv = embedder.encode(queries, is_query=True)  # (nq, dim)
        order = np.argsort(-(qv @ pv.T), axis=1)[:, :50]  # (nq, 50)
        return [[titles[i] for i in row] for row in order]

    done_path = out / "dialogues.jsonl"
    done = {}
    if done_path.exists():
        for line in done_path.read_text().splitlines():
            if line.strip():
                d = json.loads(line)
                done[d["id"]] = d
    base = build_memory(MemoryConfig(load={"device": "cpu"})) if not args.report_only else None
    cfg = SessionConfig(standalone_tokens=args.standalone_tokens, recall_tokens=args.recall_tokens)
    conv = Conversations(SessionStore(str(out / "store"), config=cfg), lambda name: base)
    owner = owner_of("bench", "hotpot")
    todo = [] if args.report_only else [d for d in dialogues if d["id"] not in done]
    print(f"{len(dialogues)} dialogues built, {len(done)} done, {len(todo)} to run", flush=True)
    with done_path.open("a") as fh:
        for i, d in enumerate(todo):
            t0 = time.perf_counter()
            cited = rank([d["turn1"]])[0][:3]
            s = conv.sessions.create("hotpot", owner)
            conv.record("hotpot", owner, s.id, d["turn1"], d["answer1"], cited)
            t1 = time.perf_counter()
            ctx = conv.prepare("hotpot", owner, d["turn2"], session_id=s.id)
            rec = {**d, "cited1": cited, "standalone": ctx.standalone, "recalls": ctx.session_recalls,
                   "record_s": round(t1 - t0, 2), "prepare_s": round(ctx.seconds, 2)}
            conv.sessions.delete("session", s.id, owner)
            fh.write(json.dumps(rec) + "\n")
            fh.flush()
            done[d["id"]] = rec
            print(f"[{i + 1}/{len(todo)}] {time.perf_counter() - t0:.1f} s  {d['turn2']!r} -> "
                  f"{ctx.standalone!r} | {ctx.session_recalls[:2]}", flush=True)

    ks = [int(k) for k in args.ks.split(",")]
    fusion = FusionConfig()
    conds = ("question", "history", "session", "standalone")
    scores = {c: {k: [] for k in ks} for c in conds}
    from memorag_core.prompts import PROMPTS
    from memorag_core.query.sessions import RECALL_PROMPT, STANDALONE_PROMPT, Conversations as _C, _lines

    class _P:  # the echo text the session code filters against (English prompts)
        prompts = PROMPTS["en"]

    echo = _C.echo(_P, STANDALONE_PROMPT + " " + RECALL_PROMPT, "")
    for d in (done[x["id"]] for x in dialogues if x["id"] in done):
        q2 = d["turn2"]
        # generations stored by an older run are filtered again with the current echo filter (deterministic)
        d["standalone"] = (_lines(d["standalone"] or "", 1, echo) or [None])[0]
        d["recalls"] = _lines("\n".join(d["recalls"]), echo_of=echo)
        session_q = ([d["standalone"]] if d["standalone"] else []) + list(d["recalls"])
        ranked = rank([q2, f"{d['turn1']} {d['answer1']} {q2}", d["standalone"] or q2] + session_q)
        rq, rh, rs = ranked[0], ranked[1], ranked[2]
        fused = fuse([Ranking("question", q2, rq[:10], [0.0] * 10)]
                     + [Ranking("session", q, r[:10], [0.0] * 10) for q, r in zip(session_q, ranked[3:])],
                     fusion, limit=max(ks))
        rf = [f.key for f in fused]
        for k in ks:
            scores["question"][k].append(recall_at(rq, d["gold"], k))
            scores["history"][k].append(recall_at(rh, d["gold"], k))
            scores["session"][k].append(recall_at(rf, d["gold"], k))
            scores["standalone"][k].append(recall_at(rs, d["gold"], k))
    n = len(scores["question"][ks[0]])
    prep = sorted(done[x["id"]]["prepare_s"] for x in dialogues if x["id"] in done)
    table = {"n": n, "passages": len(passages), "ks": ks,
             "recall": {c: {str(k): round(100 * sum(v) / max(1, len(v)), 1) for k, v in scores[c].items()}
                        for c in conds},
             "median_prepare_s": prep[len(prep) // 2] if prep else None,
             "standalone_written": sum(1 for x in dialogues if x["id"] in done and done[x["id"]]["standalone"]),
             "with_session_queries": sum(1 for x in dialogues if x["id"] in done
                                         and (done[x["id"]]["standalone"] or done[x["id"]]["recalls"]))}
    (out / "results.json").write_text(json.dumps(table, indent=2))
    print(f"\nturn-2 recall@k of both gold paragraphs, n={n} dialogues, {len(passages)} pooled passages")
    print("| condition | " + " | ".join(f"R@{k}" for k in ks) + " |")
    print("|---|" + "---|" * len(ks))
    for c in conds:
        print(f"| {c} | " + " | ".join(f"{table['recall'][c][str(k)]:.1f}" for k in ks) + " |")
    print(f"standalone written for {table['standalone_written']}/{n}, any session query for "
          f"{table['with_session_queries']}/{n}; median prepare {table['median_prepare_s']} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
