"""The `memorag` CLI: memorize a file or a folder into a bundle, ask from it, and clear errors on bad input."""

from __future__ import annotations

import json

from jobs.cli import main


def test_memorize_then_ask(tiny_lm_dir, shared_data_dir, tmp_path, capsys):
    book = tmp_path / "book.txt"
    book.write_text((shared_data_dir / "harry_potter.txt").read_text(encoding="utf-8")[:3000], encoding="utf-8")
    bundle = tmp_path / "bundle"
    common = ["--model", str(tiny_lm_dir), "--ratio", "4", "--window", "256"]
    assert main(["memorize", str(book), "--save-dir", str(bundle), *common]) == 0
    out = capsys.readouterr().out
    assert "compression" in out and "memory.safetensors" in out and "tokens/s" in out
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert {"memory.safetensors", "chunks.parquet", "index.faiss"} <= set(manifest["files"])

    assert manifest["memory"]["config"]["ratio"] == 4 and manifest["memory"]["config"]["window"] == 256
    # ask reads model, ratio and window from the bundle: no flags needed
    assert main(["ask", "Who lives on Privet Drive?", "--from", str(bundle), "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert "answer:" in out and "retrieved" in out and "clues:" not in out  # the default writes no text clues
    assert main(["ask", "Who lives on Privet Drive?", "--from", str(bundle), "--max-new-tokens", "4",
                 "--use-memory-answer"]) == 0
    out = capsys.readouterr().out
    assert "clues:" in out and "answer:" in out
    # a flag that contradicts the bundle is an override, refused by the memory file's fingerprint check
    assert main(["ask", "Who?", "--from", str(bundle), "--ratio", "8", "--max-new-tokens", "3"]) == 2
    assert "load it with the same model and config" in capsys.readouterr().err
    assert main(["ask", "Who?", "--from", str(bundle), "--task", "qa", *common, "--max-new-tokens", "3"]) == 0
    assert "answer:" in capsys.readouterr().out
    # the bundle records its embedder and chunk size (the embedder's limit), and ask uses that embedder
    assert manifest["retrieval"]["embedder"] == "embedded:all-minilm-l6-v2"
    assert manifest["retrieval"]["chunk_size"] == 254
    manifest["retrieval"]["embedder"] = str(tmp_path / "another-embedder")
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    assert main(["ask", "Who?", "--from", str(bundle), "--max-new-tokens", "3"]) != 0
    assert "another-embedder" in capsys.readouterr().err


def test_memorize_a_folder_and_bad_inputs(tiny_lm_dir, tmp_path, capsys):
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "a.txt").write_text("The first document talks about owls and letters. " * 20, encoding="utf-8")
    (folder / "b.txt").write_text("The second document is about a flying car. " * 20, encoding="utf-8")
    common = ["--model", str(tiny_lm_dir), "--ratio", "2", "--window", "128"]
    assert main(["memorize", str(folder), "--save-dir", str(tmp_path / "b"), *common]) == 0
    capsys.readouterr()

    assert main(["memorize", str(tmp_path / "missing.txt"), "--save-dir", str(tmp_path / "x"), *common]) == 2
    assert "does not exist" in capsys.readouterr().err
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9".encode("latin-1"))
    assert main(["memorize", str(bad), "--save-dir", str(tmp_path / "y"), *common]) == 2
    assert "not valid UTF-8" in capsys.readouterr().err
    assert main(["memorize", str(folder / "a.txt"), "--save-dir", str(tmp_path / "z"), *common[:2], "--ratio",
                 "0"]) == 2
    assert "ratio" in capsys.readouterr().err
    assert main(["ask", "Who?", "--from", str(tmp_path / "nothing-here"), *common]) == 2
    assert "manifest" in capsys.readouterr().err
    assert not (tmp_path / "y").exists() and not (tmp_path / "z").exists()  # nothing half-written


def test_ask_a_published_collection(tiny_collection, capsys):
    """`memorag ask --collection --store`: streamed answer, clues, then evidence with doc ids; bad input -> 2."""
    store = tiny_collection.store
    args = ["--collection", "facts", "--store", store, "--units", "1", "--top-k", "2", "--max-new-tokens", "4",
            "--clue-max-new-tokens", "8"]
    assert main(["ask", "Who built the lighthouse of Varnholm?", *args, "--use-memory-answer"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("answer: ") and "clues:" in out and f"evidence (facts @ {tiny_collection.version})" in out
    assert "lighthouse  score" in out and "retrieve" in out
    assert main(["ask", "Who opened the bakery?", *args, "--task", "qa"]) == 0
    out = capsys.readouterr().out
    assert "bakery  score" in out and "clues:" not in out
    assert main(["ask", "Who?", "--collection", "nope", "--store", store]) == 2
    assert "'nope'" in capsys.readouterr().err
    assert main(["ask", "Who?", "--collection", "facts"]) == 2
    assert "--store" in capsys.readouterr().err
    assert main(["ask", "Who?", *args, "--top-k", "0"]) == 2
    assert "top_k must be between" in capsys.readouterr().err
    assert main(["ask", "Who opened the bakery?", *args, "--task", "qa", "--candidates", "3", "--json"]) == 0
    ranked = json.loads(capsys.readouterr().out)
    assert len(ranked["ranking"]) == 3 and [r["chunk_id"] for r in ranked["ranking"][:2]] == [
        e["chunk_id"] for e in ranked["evidence"]]
    assert main(["ask", "Who?", *args, "--plan", '{"evidence_order": "sideways"}']) == 2
    assert "evidence_order" in capsys.readouterr().err
    assert main(["ask", "Who?", "--collection", "facts", "--store", store, "--from", "x"]) == 2
