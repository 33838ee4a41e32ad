"""Memory benchmark: memorize throughput and bytes per token by ratio, load time, and query latency by stage.

CPU (default): the embedded SmolLM2-135M-Instruct on an excerpt of harry_potter.txt, beside plain transformers
prefill of the same tokens (one forward in windows with a growing cache, nothing dropped) in the same run, so
ratios are comparable on a noisy shared machine::

    python benchmarks/bench_memory.py --tokens 8000 --ratios 1 4 8 16

GPU: a Mistral-7B-shaped random-weight model in bf16 (32 layers, hidden 4096, 32 heads, 8 KV heads, MLP 14336,
vocab 32000), prefill tokens/s and its fraction of the GPU's bf16 roofline (2 x params FLOP per token)::

    python benchmarks/bench_memory.py --gpu-mistral --tokens 32000 --ratios 1 4 8 --peak-tflops 989

No copies of the memory (``--copies``): a memory of ``--copies-entries`` random entries per layer, then a window
read (default scoring and every query scoring, ``obs_sample=0``) and a decode prompt pass of ``--copies-rows``
prompts; prints each one's peak allocation beyond what existed before, beside one layer's memory (K + V) and
what a copy per KV group (transformers' ``repeat_kv``) or per row would add. CUDA: ``torch.cuda.max_memory_allocated``;
CPU: torch.profiler's allocation events (``profile_memory=True``)::

    python benchmarks/bench_memory.py --copies --gpu-mistral --mistral-layers 4 --copies-entries 250000 --window 2048
    python benchmarks/bench_memory.py --copies --gpu-mistral --device cpu --mistral-layers 1 \
        --copies-entries 8192 --window 256 --cuda-path   # the CUDA code path on the CPU (a check)

Prints a Markdown table; ``--json FILE`` also writes the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from memorag_core.memory import MemoryConfig, build_memory  # noqa: E402
from memorag_core.memory.profiling import peak_extra_bytes  # noqa: E402
from memorag_core.models import load_causal_lm  # noqa: E402


def book_tokens(tokenizer, n_tokens: int, book: Path) -> str:
    """The first ``n_tokens`` tokens of the book, as text (whole words)."""
    text = book.read_text(encoding="utf-8")
    ids = tokenizer(text[: n_tokens * 8], add_special_tokens=False)["input_ids"][:n_tokens]
    return tokenizer.decode(ids)


@torch.no_grad()
def plain_prefill(model, ids: list[int], window: int) -> float:
    """Seconds for a plain transformers prefill of ``ids`` in windows (full cache, nothing dropped)."""
    from transformers import DynamicCache

    cache = DynamicCache()
    sync()
    start = time.perf_counter()
    for s in range(0, len(ids), window):
        x = torch.tensor([ids[s:s + window]], device=model.device)
        model(input_ids=x, past_key_values=cache, use_cache=True, logits_to_keep=1)
    sync()
    return time.perf_counter() - start


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def mistral_shaped(device: str, layers: int = 32):
    """A random-weight Mistral-7B-shaped model (bf16) and the embedded tokenizer (its vocab is only for text).

    ``layers`` < 32 keeps every other dimension and shrinks depth (a CPU check of this code path)."""
    from transformers import MistralConfig, MistralForCausalLM

    from memorag_core.models import load_tokenizer

    config = MistralConfig(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers,
                           num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=32768,
                           rope_theta=1e6, sliding_window=None)  # v0.2/v0.3: no sliding window (memories refuse one
    # shorter than themselves, see memorag_core/memory/rope.py)
    with torch.device(device):
        model = MistralForCausalLM(config).to(torch.bfloat16).eval()
    tok = load_tokenizer(None)
    return model, tok


def random_memory(model, tok, entries: int, window: int, **config):
    """A compressed memory holding ``entries`` random entries per layer (capacity for two more windows)."""
    from memorag_core.prompts import EN

    mem = build_memory(MemoryConfig(ratio=4, window=window, **config), model, tok)
    cfg = model.config.get_text_config()
    kv, d = cfg.num_key_value_heads, getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    mem._reset_state()
    mem.prompts = EN
    like = torch.empty(1, kv, 0, d, dtype=model.dtype, device=model.device)
    for layer in mem.cache.layers:
        layer.reserve(entries + 2 * window, like, like)
        layer.k_buf[:, :, :entries].normal_()
        layer.v_buf[:, :, :entries].normal_()
        layer.set_length(entries)
    mem.entries = mem.next_position = entries
    return mem


def copies(model, tok, args) -> list[dict]:
    """Peak extra allocation of a window read and a decode prompt pass after a memory (see the module docstring)."""
    from memorag_core.memory import attention

    fused = attention.masked_gqa_is_fused
    if args.cuda_path:
        attention.masked_gqa_is_fused = lambda device: False
    try:
        return _copies(model, tok, args)
    finally:
        attention.masked_gqa_is_fused = fused


def _copies(model, tok, args) -> list[dict]:
    from memorag_core.memory.kv_decode import decode_after_cache

    cfg = model.config.get_text_config()
    group = cfg.num_attention_heads // cfg.num_key_value_heads
    vocab, m, w = cfg.vocab_size, args.copies_entries, args.window
    rows = []
    for name, config in [("window read, default scoring", {}), ("window read, obs_sample=0", {"obs_sample": 0})]:
        mem = random_memory(model, tok, m, w, **config)
        layer_bytes = 2 * mem.cache.layers[0].keys.numel() * mem.cache.layers[0].keys.element_size()
        ids = torch.randint(100, vocab, (w,)).tolist()
        peak = peak_extra_bytes(lambda: mem._ingest(ids, is_prefix=False), model.device)
        rows.append({"case": name, "peak_extra_MB": peak / 1e6, "layer_memory_MB": layer_bytes / 1e6,
                     "repeat_kv_MB": group * layer_bytes / 1e6})
        del mem
    mem = random_memory(model, tok, m, w)
    prompts = [torch.randint(100, vocab, (64 - 3 * i,)).tolist() for i in range(args.copies_rows)]
    peak = peak_extra_bytes(lambda: decode_after_cache(model, mem.cache, mem.next_position, prompts,
                                                       max_new_tokens=1, eos_ids=set(), pad_id=0), model.device)
    rows.append({"case": f"decode prompt pass, {len(prompts)} rows", "peak_extra_MB": peak / 1e6,
                 "layer_memory_MB": layer_bytes / 1e6, "repeat_kv_MB": group * len(prompts) * layer_bytes / 1e6})
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=8000, help="tokens of the book to memorize")
    p.add_argument("--ratios", type=int, nargs="+", default=[1, 4, 8, 16])
    p.add_argument("--window", type=int, default=1024)
    p.add_argument("--scoring", nargs="+", default=["0:128"], metavar="OBS:SAMPLE",
                   help="compressed_kv scoring rules as obs_window:obs_sample (0:128 the default, 0:0 every query "
                        "of the window, 32:0 SnapKV's last 32)")
    p.add_argument("--book", type=Path, default=Path(__file__).resolve().parents[2] / "shared/data/harry_potter.txt")
    p.add_argument("--gpu-mistral", action="store_true", help="Mistral-7B-shaped random model in bf16 on CUDA")
    p.add_argument("--mistral-layers", type=int, default=32, help="depth of the Mistral-shaped model (CPU check: 1)")
    p.add_argument("--device", default="cuda", help="device of the Mistral-shaped model (cpu only to check the path)")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="GPU bf16 dense peak (H100 SXM: 989)")
    p.add_argument("--queries", type=int, default=3, help="queries timed per stage (CPU mode)")
    p.add_argument("--copies", action="store_true", help="peak extra allocation after a memory (no copies)")
    p.add_argument("--copies-entries", type=int, default=250_000, help="memory entries per layer for --copies")
    p.add_argument("--copies-rows", type=int, default=8, help="prompts in the decode prompt pass for --copies")
    p.add_argument("--cuda-path", action="store_true", help="take the CUDA attention path on the CPU (a check)")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)

    if args.gpu_mistral:
        if args.device.startswith("cuda") and not torch.cuda.is_available():
            p.error("--gpu-mistral needs a CUDA GPU (or --device cpu --mistral-layers 1 to check the code path)")
        model, tok = mistral_shaped(args.device, args.mistral_layers)
        vocab = model.config.vocab_size
        ids = torch.randint(100, vocab, (args.tokens,)).tolist()
        text = None
    else:
        model, tok = load_causal_lm(None)
        text = book_tokens(tok, args.tokens, args.book)
        ids = tok(text, add_special_tokens=False)["input_ids"]
    params = sum(p.numel() for p in model.parameters())
    if args.copies:
        rows = copies(model, tok, args)
        device = torch.cuda.get_device_name() if model.device.type == "cuda" else f"CPU ({os.cpu_count()} cores)"
        print(f"\n{device}, {model.config.num_hidden_layers}-layer Mistral-shaped {model.dtype}, "
              f"{args.copies_entries} memory entries, window {args.window}\n")
        print("| case | peak extra MB | one layer's memory MB | a copy per KV group (and row) MB |\n|---|---|---|---|")
        for r in rows:
            print(f"| {r['case']} | {r['peak_extra_MB']:.1f} | {r['layer_memory_MB']:.1f} | {r['repeat_kv_MB']:.1f} |")
        if args.json:
            args.json.write_text(json.dumps({"device": device, "rows": rows}, indent=2))
        return 0
    # warm up: the first forward in a process is several times slower
    plain_prefill(model, ids[: min(len(ids), 256)], args.window)
    base_s = plain_prefill(model, ids, args.window)
    rows = [{"mode": "plain transformers prefill", "ratio": "-", "tokens": len(ids), "seconds": base_s,
             "tokens_per_s": len(ids) / base_s, "vs_plain": 1.0}]

    try:
        rules = [tuple(int(x) for x in rule.split(":")) for rule in args.scoring]
    except ValueError:
        p.error(f"--scoring takes obs_window:obs_sample pairs of integers, got {args.scoring}")
    for (obs, sample), ratio in [(rule, r) for rule in rules for r in args.ratios]:
        kind = "full_kv" if ratio == 1 else "compressed_kv"
        if kind == "full_kv" and (obs, sample) != rules[0]:
            continue  # nothing is scored at ratio 1: one row is enough
        mem = build_memory(MemoryConfig(kind=kind, ratio=ratio, window=args.window, obs_window=obs,
                                        obs_sample=sample), model, tok)
        sync()
        start = time.perf_counter()
        if text is None:  # random ids on the GPU model: feed ids directly through the same code path
            # random ids stand in for text (the tokenizer's vocab is not the model's): a 64-token uncompressed
            # prefix, then the body through the same windowed code path as memorize()
            mem.prompts = __import__("memorag_core.prompts", fromlist=["EN"]).EN
            mem._ingest(ids[:64], is_prefix=True)
            mem._ingest(ids, is_prefix=False)
            mem.stats.raw_tokens = len(ids)
            mem.stats.entries = mem._state_entries()
            mem.stats.nbytes = mem._state_nbytes()
        else:
            mem.memorize(text)
        sync()
        secs = time.perf_counter() - start
        row = {"mode": kind, "ratio": ratio, "scoring": f"{obs}:{sample}" if kind != "full_kv" else "",
               "tokens": len(ids), "seconds": secs, "tokens_per_s": len(ids) / secs, "vs_plain": base_s / secs,
               "entries": mem.entries, "bytes": mem.stats.nbytes, "bytes_per_token": mem.stats.nbytes / len(ids)}
        if args.gpu_mistral:
            row["roofline_fraction"] = (2 * params * len(ids) / secs) / (args.peak_tflops * 1e12)
        else:
            with tempfile.TemporaryDirectory() as d:
                info = mem.save(os.path.join(d, "m.safetensors"))
                other = build_memory(mem.config, model, tok)
                start = time.perf_counter()
                other.load(info.url, expected_sha256=info.sha256)
                row["load_s"] = time.perf_counter() - start
                row["file_bytes"] = info.nbytes
            clue_s = []
            for q in ["Why does Dobby warn Harry?", "Who is Ron's sister?", "What happens at the Burrow?"][
                    : args.queries]:
                start = time.perf_counter()
                mem.clue_texts(q, max_new_tokens=32)
                clue_s.append(time.perf_counter() - start)
            row["clues_s_median"] = statistics.median(clue_s)
        rows.append(row)
        del mem

    # the baseline again at the end: on a shared machine the spread between the two shows the noise
    base_end = plain_prefill(model, ids, args.window)
    rows.append({"mode": "plain transformers prefill (again, at the end)", "ratio": "-", "tokens": len(ids),
                 "seconds": base_end, "tokens_per_s": len(ids) / base_end, "vs_plain": base_s / base_end})
    if not args.gpu_mistral:
        rows.append(stage_latency(model, tok, text, args))

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    print(f"\n{device}, {'Mistral-7B-shaped bf16' if args.gpu_mistral else 'SmolLM2-135M fp32'}, "
          f"{params / 1e6:.0f}M params, {len(ids)} tokens, window {args.window}\n")
    cols = [c for c in ["mode", "ratio", "scoring", "tokens_per_s", "vs_plain", "entries", "bytes_per_token",
                        "load_s", "clues_s_median", "retrieve_s", "generate_s", "roofline_fraction"]
            if any(c in r for r in rows)]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |")
    if args.json:
        args.json.write_text(json.dumps({"device": device, "rows": rows}, indent=2))
    return 0


def stage_latency(model, tok, text: str, args) -> dict:
    """Query latency split by stage with the facade (ratio 8): clues, retrieval, generation (median of queries)."""
    from memorag_core.facade import MemoRAG

    pipe = MemoRAG(memory_config=MemoryConfig(ratio=8, window=args.window), clue_max_new_tokens=32)
    pipe.memorize(text)
    clue_s, ret_s, gen_s = [], [], []
    for q in ["Why does Dobby warn Harry?", "Who is Ron's sister?", "What happens at the Burrow?"][: args.queries]:
        t0 = time.perf_counter()
        clues = pipe.clues(q)
        t1 = time.perf_counter()
        hits = pipe.retrieve(clues.retrieval_queries)
        t2 = time.perf_counter()
        pipe.answer_from_evidence(q, [h.text for h in hits], max_new_tokens=32)
        t3 = time.perf_counter()
        clue_s.append(t1 - t0), ret_s.append(t2 - t1), gen_s.append(t3 - t2)
    return {"mode": "query stages (facade, ratio 8)", "ratio": 8, "clues_s_median": statistics.median(clue_s),
            "retrieve_s": statistics.median(ret_s), "generate_s": statistics.median(gen_s)}


def fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
    return str(v)


if __name__ == "__main__":
    raise SystemExit(main())
