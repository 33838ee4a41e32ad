"""``CompressedKVMemory``: training-free compressed KV memory for any Hugging Face causal LM.

The text is prefilled in windows of ``window`` tokens. Each window attends to the memory so far plus itself;
then, per layer and per KV head, the ``ceil(w / ratio)`` window entries that the window's tokens (by default 128
spread evenly over it; the last ``obs_window`` when set, as SnapKV does) attend to most are kept, the rest forgotten
(see ``scoring.py``; the rule was chosen by benchmarks/selection_study.py). The memory after n windows therefore
holds ``prefix + sum ceil(w_i / ratio)`` entries per layer and KV head, whatever the text length.

Positions. With ``positions="original"`` a kept key keeps the rotary position of its token, so the next token
sits at position T (raw tokens read). That pushes long texts past the model's trained range (SmolLM2: 8192).
With ``positions="compact"`` (default) the kept entries are re-rotated onto consecutive positions right after
the memory so far: entry j of the memory sits at position j, and the next token at M (entries kept). RoPE
rotations compose additively, so re-rotating a key by ``delta = new - old`` equals having computed it at the new
position. Per head the kept tokens differ, but each head keeps the same count, so the j-th kept entry of every
head gets position j.

Selection is written once, here; subclasses change only ``score`` (what is worth keeping) or the ratio.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from memorag_core.errors import UnsupportedModelError
from memorag_core.memory import kv_buffer, rope, scoring
from memorag_core.memory.base import Memory, check_text
from memorag_core.memory.kv_decode import decode_after_cache

if TYPE_CHECKING:
    from memorag_core.store.memory_file import MemoryTensors

logger = logging.getLogger(__name__)


def _top(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """Indices of the ``keep`` best scores per row (..., w) -> (..., keep), in increasing order.

    Ties (max-pooling makes plateaus of equal scores) go to the earlier entry, whatever the row's padding: a
    stable sort, where ``topk`` breaks ties by an order that depends on the tensor's length, so a window read
    alone and the same window read in a padded batch could keep different entries.
    """
    return scores.sort(dim=-1, descending=True, stable=True).indices[..., :keep].sort(dim=-1).values


@dataclass
class _Row:
    """Reading state of one memory (one row of the layer buffers)."""

    entries: int = 0  # kept entries per layer and KV head
    next_position: int = 0  # rotary position of the next token
    source_tokens: int = 0  # text tokens read so far (offset of the next window's first token)


class CompressedKVMemory(Memory):
    """Windowed prefill that keeps ``ceil(window/ratio)`` entries per window, layer and KV head."""

    kind: ClassVar[str] = "compressed_kv"

    def __init__(self, config, model=None, tokenizer=None) -> None:
        super().__init__(config, model, tokenizer)
        # Refuse what the memory cannot do correctly on this model (rope.py says what and why).
        self.support = rope.check_model(self.model, window=config.window,
                                        needs_rotation=config.positions == "compact" and config.ratio > 1)
        # Our attention implementation records scores for compression and decodes after the memory without
        # copying it (memorag_core/memory/attention.py); otherwise it is plain SDPA.
        self.model.set_attn_implementation(scoring.register())
        max_pos = getattr(self.model.config.get_text_config(), "max_position_embeddings", None)
        self._max_positions = int(max_pos) if max_pos else None

    # -- state --------------------------------------------------------------------------------------------------
    @property
    def _num_layers(self) -> int:
        return self.model.config.get_text_config().num_hidden_layers

    def _reset_state(self) -> None:
        # Per layer: preallocated K/V buffers and the source token offset of every kept entry (attention pointers,
        # -1 for the uncompressed prompt head), written in place (kv_buffer.py).
        self.cache = kv_buffer.memory_cache(self._num_layers)
        self._row = _Row()
        self._warned_range = False

    @property
    def entries(self) -> int:
        return self._row.entries

    @entries.setter
    def entries(self, n: int) -> None:
        self._row.entries = n

    @property
    def next_position(self) -> int:
        return self._row.next_position

    @next_position.setter
    def next_position(self, n: int) -> None:
        self._row.next_position = n

    @property
    def offsets(self) -> list[torch.Tensor]:
        """Per layer, (1, kv_heads, entries) int32 source token offsets of the kept entries (-1: prompt head),
        on the CPU; ``[]`` when unknown (a file written before pointers) or nothing is memorized."""
        offs = [layer.offsets for layer in self.cache.layers]
        if not self.entries or any(o is None for o in offs):
            return []
        return [o.cpu() for o in offs]

    def _state_entries(self) -> int:
        return self.entries

    def _state_nbytes(self) -> int:
        return sum(layer.keys.numel() * layer.keys.element_size() * 2 for layer in self.cache.layers
                   if layer.keys is not None)

    # -- reading ------------------------------------------------------------------------------------------------
    def _keep_count(self, w: int, compress: bool) -> int:
        return math.ceil(w / self.config.ratio) if compress else w

    def _ingest(self, token_ids: list[int], *, is_prefix: bool) -> None:
        from tqdm.auto import tqdm

        window = self.config.window
        compress = not is_prefix and self.config.ratio > 1
        starts = range(0, len(token_ids), window)
        need = self.entries + sum(self._keep_count(min(window, len(token_ids) - s), compress) for s in starts)
        for layer in self.cache.layers:  # one allocation for the whole text (no growth copies)
            if layer.k_buf is not None:
                layer.reserve(need + window)
        bar = tqdm(starts, desc="memorizing", unit="window", disable=is_prefix or not self.show_progress)
        for start in bar:
            ids = token_ids[start:start + window]
            self._read_windows(self.cache, [self._row], [ids], [compress], [is_prefix])

    @torch.no_grad()
    def _read_windows(self, cache: Any, rows: list[_Row], windows: list[list[int]], compress: list[bool],
                      prefix: list[bool]) -> None:
        """Prefill one window per row after that row's memory; keep its best entries (all if not compressed).

        Rows are right-padded to the longest window; row i's memory holds ``rows[i].entries`` entries and the
        buffers ``cache.layers[*].length`` (the longest memory); the gap is masked. One row is the plain case.
        """
        b = len(rows)
        ws = [len(w) for w in windows]
        width = max(ws)
        base = cache.layers[0].length  # memory entries in the buffers (the longest row's)
        device = self.model.device
        for row, w in zip(rows, ws):
            self._check_range(row.next_position + w)
        self._check_sliding(base + width)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        ids = torch.full((b, width), pad, dtype=torch.long)  # (b, w) right-padded
        for i, w in enumerate(windows):
            ids[i, :len(w)] = torch.tensor(w, dtype=torch.long)
        ids = ids.to(device)
        starts = torch.tensor([r.next_position for r in rows], dtype=torch.long, device=device)
        positions = starts[:, None] + torch.arange(width, device=device)[None]  # (b, w)
        padded_mem = any(r.entries != base for r in rows)
        mask = None
        if padded_mem:  # memory padding of shorter rows is masked; window padding sits after every real token
            mask = torch.ones((b, base + width), dtype=torch.long, device=device)  # (b, M + w)
            for i, r in enumerate(rows):
                mask[i, r.entries:base] = 0
        ragged = min(ws) != width
        forward = dict(input_ids=ids, position_ids=positions, attention_mask=mask, past_key_values=cache,
                       use_cache=True, logits_to_keep=1)
        if any(compress):
            lens = torch.tensor(ws, device=device) if ragged else None
            mem_lens = torch.tensor([r.entries for r in rows], device=device) if padded_mem else None
            obs = self.config.obs_window or width  # 0: every query of the window scores its entries
            with scoring.capture_scores(obs, start=base, rows=lens, mem_lens=mem_lens,
                                        sample=self.config.obs_sample) as scores:
                self.model(**forward)
        else:
            scores = None
            self.model(**forward)
        keeps = [self._keep_count(w, c) for w, c in zip(ws, compress)]
        sources = [-1 if p else r.source_tokens for r, p in zip(rows, prefix)]
        uniform = not padded_mem and not ragged and len(set(keeps)) == 1 and len(set(compress)) == 1
        for layer_idx, layer in enumerate(cache.layers):
            window_scores = None
            if scores is not None:
                window_scores = self.score(scores[layer_idx], layer_idx)  # (b, kv_heads, w)
                if ragged:
                    slot = torch.arange(width, device=device)[None, None]
                    window_scores = window_scores.masked_fill(slot >= torch.tensor(ws, device=device)[:, None, None],
                                                              float("-inf"))
            if uniform:
                self._keep_top(layer, base, window_scores if compress[0] else None, keeps[0], layer_idx, sources)
            else:
                self._keep_rows(layer, base, window_scores, rows, keeps, compress, sources, layer_idx)
        for row, w, keep, c, p in zip(rows, ws, keeps, compress, prefix):
            row.entries += keep
            row.next_position += keep if (c and self.config.positions == "compact") else w
            if not p:
                row.source_tokens += w

    @torch.no_grad()
    def memorize_many(self, texts: list[str | bytes]) -> list["MemoryTensors"]:
        """Memorize several texts, each its own memory, reading one window of every text per model forward.

        The texts' windows are stacked as the rows of one batch (right-padded to the longest window; memories
        of unequal length padded and masked), so a GPU reads ``len(texts)`` windows per forward instead of one.
        Each row gets what :meth:`memorize` would give it alone up to float rounding (tested on tiny models), not
        byte for byte: a near-tie in the scores can then keep another token (SmolLM2: 33 of 16,470 entries of one
        text; docs/memory.md), so unit files from the two routes differ.
        A row whose text is read leaves the batch (one copy of the remaining rows). Texts are processed longest
        first; the result is in the given order. Afterwards this memory holds the last text.

        Returns:
            per text, its :class:`MemoryTensors` (header with stats; ``stats.seconds`` is the batch's wall time
            shared by token count).
        """
        from memorag_core.memory.config import MemoryStats
        from memorag_core.prompts import get_prompts

        texts = [check_text(t) for t in texts]
        if len(texts) <= 1:
            return super().memorize_many(texts)
        start_time = time.perf_counter()
        window, compress = self.config.window, self.config.ratio > 1
        units = []
        for text in texts:
            self.prompts = get_prompts(self.config.language, text)
            head, body = self.head_ids(), self._encode(text)
            wins = [(head[s:s + window], False, True) for s in range(0, len(head), window)]
            wins += [(body[s:s + window], compress, False) for s in range(0, len(body), window)]
            need = sum(self._keep_count(len(w), c) for w, c, _ in wins)
            units.append({"prompts": self.prompts, "windows": wins, "row": _Row(), "tokens": len(body),
                          "need": need})
        active = sorted(range(len(units)), key=lambda u: -len(units[u]["windows"]))  # batch row -> unit
        cache = kv_buffer.memory_cache(self._num_layers)
        taken: dict[int, list[tuple]] = {}
        step = 0
        while active:
            wins = [units[u]["windows"][step] for u in active]
            self._read_windows(cache, [units[u]["row"] for u in active], [w[0] for w in wins],
                               [w[1] for w in wins], [w[2] for w in wins])
            if step == 0:  # one allocation for the whole batch (no growth copies)
                for layer in cache.layers:
                    layer.reserve(max(units[u]["need"] for u in active) + window)
            step += 1
            done = [j for j, u in enumerate(active) if len(units[u]["windows"]) == step]
            if not done:
                continue
            for j in done:
                n = units[active[j]]["row"].entries
                taken[active[j]] = [(layer.k_buf[j:j + 1, :, :n].clone(), layer.v_buf[j:j + 1, :, :n].clone(),
                                     None if layer.off_buf is None else layer.off_buf[j:j + 1, :, :n].clone())
                                    for layer in cache.layers]  # each (1, kv_heads, entries, d)
            keep = [j for j in range(len(active)) if j not in done]
            if keep:
                rows = torch.tensor(keep, device=cache.layers[0].k_buf.device)
                longest = max(units[active[j]]["row"].entries for j in keep)
                for layer in cache.layers:
                    layer.select_rows(rows)
                    layer.set_length(longest)
            active = [active[j] for j in keep]
        seconds = time.perf_counter() - start_time
        total = sum(u["tokens"] for u in units) or 1
        out = []
        for u, unit in enumerate(units):
            self.cache = kv_buffer.memory_cache(self._num_layers)
            for layer, (k, v, off) in zip(self.cache.layers, taken[u]):
                layer.adopt(k, v, off)
            self._row, self.prompts = unit["row"], unit["prompts"]
            self.stats = MemoryStats(raw_tokens=unit["tokens"], entries=self.entries, nbytes=self._state_nbytes(),
                                     seconds=seconds * unit["tokens"] / total)
            out.append(self.export())
        logger.info("memorized %d texts, %d tokens, in %.1fs (batched)", len(texts), total, seconds)
        return out

    def score(self, window_scores: torch.Tensor, layer_idx: int) -> torch.Tensor:
        """How much each window entry is worth keeping: (b, kv_heads, w) -> (b, kv_heads, w).

        Default: the observation window's attention mass, max-pooled along the sequence so that the neighbours
        of a strongly attended token survive with it. Override this (only this) for another criterion.
        """
        k = self.config.pool_kernel
        if k > 1 and window_scores.shape[-1] >= k:
            window_scores = torch.nn.functional.max_pool1d(window_scores, kernel_size=k, stride=1, padding=k // 2)
        return window_scores

    def _keep_top(self, layer: Any, mem: int, window_scores: torch.Tensor | None, keep: int, layer_idx: int = 0,
                  sources: list[int] | None = None) -> torch.Tensor:
        """Every row: replace the layer's window entries (after ``mem``) by the ``keep`` best per KV head, in
        their original order, written in place over the window; return their window offsets (b, kv_heads, keep).

        ``window_scores`` None keeps the first ``keep`` window entries where they are (an uncompressed window).
        ``sources``: per row, the source offset of the window's first token (-1: prompt head, offsets -1).
        """
        rows, heads = layer.k_buf.shape[:2]
        device = layer.k_buf.device
        if window_scores is None:
            idx = torch.arange(keep, device=device)[None, None].expand(rows, heads, keep)  # (b, kv_heads, keep)
        else:
            idx = _top(window_scores, keep)  # (b, kv_heads, keep)
            window_k = layer.k_buf[:, :, mem:layer.length]  # (b, kv_heads, w, dk), a view
            window_v = layer.v_buf[:, :, mem:layer.length]
            kept_k = window_k.gather(2, idx[..., None].expand(-1, -1, -1, window_k.shape[-1]))  # (b, h, keep, dk)
            kept_v = window_v.gather(2, idx[..., None].expand(-1, -1, -1, window_v.shape[-1]))  # (b, h, keep, dv)
            if self.config.positions == "compact":
                # Token at window offset idx sat at position next_position + idx; it moves to next_position + rank.
                delta = torch.arange(keep, device=device) - idx  # (b, kv_heads, keep), <= 0
                kept_k = self._rerotate(kept_k, delta, layer_idx)
            layer.k_buf[:, :, mem:mem + keep] = kept_k  # in place: the memory before ``mem`` is not touched
            layer.v_buf[:, :, mem:mem + keep] = kept_v
        if layer.off_buf is not None:
            src = torch.tensor(sources if sources is not None else [0] * rows, device=device)[:, None, None]
            layer.off_buf[:, :, mem:mem + keep] = torch.where(src >= 0, idx + src, -1).to(torch.int32)
        layer.set_length(mem + keep)
        return idx

    def _keep_rows(self, layer: Any, base: int, window_scores: torch.Tensor | None, rows: list[_Row],
                   keeps: list[int], compress: list[bool], sources: list[int], layer_idx: int) -> None:
        """:meth:`_keep_top` row by row, for rows whose memories or windows differ in length: row i's kept entries
        move from the window (after ``base``) to right after its own memory (``rows[i].entries``)."""
        heads = layer.k_buf.shape[1]
        device = layer.k_buf.device
        for i, (row, keep, c, src) in enumerate(zip(rows, keeps, compress, sources)):
            if c:
                idx = _top(window_scores[i:i + 1], keep)  # (1, kv_heads, keep)
            else:
                idx = torch.arange(keep, device=device)[None, None].expand(1, heads, keep)
            kept_k = layer.k_buf[i:i + 1, :, base:].gather(2, idx[..., None].expand(-1, -1, -1, layer.k_buf.shape[-1]))
            kept_v = layer.v_buf[i:i + 1, :, base:].gather(2, idx[..., None].expand(-1, -1, -1, layer.v_buf.shape[-1]))
            if c and self.config.positions == "compact":
                kept_k = self._rerotate(kept_k, torch.arange(keep, device=device) - idx, layer_idx)
            m = row.entries
            layer.k_buf[i:i + 1, :, m:m + keep] = kept_k
            layer.v_buf[i:i + 1, :, m:m + keep] = kept_v
            if layer.off_buf is not None:
                layer.off_buf[i:i + 1, :, m:m + keep] = (idx + src if src >= 0 else torch.full_like(idx, -1)).to(
                    torch.int32)
        layer.set_length(max(r.entries + k for r, k in zip(rows, keeps)))

    def _rotation(self) -> rope.KeyRotation:
        if self.support.rotation is None:
            self.support.rotation = rope.KeyRotation(self.model)  # e.g. a ratio-1 memory folded by a session
        return self.support.rotation

    def _rerotate(self, keys: torch.Tensor, delta: torch.Tensor, layer_idx: int = 0) -> torch.Tensor:
        """Rotate RoPE keys (b, kv_heads, n, d) of layer ``layer_idx`` by ``delta`` positions (b, kv_heads, n)."""
        return self._rotation().rotate(keys, delta, layer_idx)

    def _check_sliding(self, end_entry: int) -> None:
        sw = self.support.sliding_window
        if sw is not None and end_entry > sw:
            raise UnsupportedModelError(
                f"{type(self.model).__name__}: the memory would reach {end_entry} entries, beyond the sliding "
                f"window of {sw} tokens of layers {self.support.sliding_layers[:8]}: those layers would silently "
                "forget the start of the memory; raise the ratio, split the text into smaller units, or use a model "
                "without sliding-window layers")

    def _check_range(self, end_position: int, what: str = "reading the text") -> None:
        """Refuse a forward whose positions reach ``end_position`` (a sequence length: last position + 1) past a
        length-dependent RoPE scaling's limit; warn once past the trained range."""
        limit = self.support.position_limit
        if limit and end_position > limit:
            raise UnsupportedModelError(
                f"{type(self.model).__name__}: {what} would reach position {end_position}, past "
                f"original_max_position_embeddings={limit}, where its length-dependent RoPE scaling (dynamic/"
                "longrope) switches frequencies: the memory's keys and the new queries would be rotated with "
                f"different frequencies (positions={self.config.positions!r}); raise the ratio, use "
                "positions='compact', split the text into smaller units, or ask for fewer new tokens")
        if self._max_positions and end_position > self._max_positions and not self._warned_range:
            self._warned_range = True
            logger.warning(
                "memory positions reach %d, beyond the model's trained range of %d (positions=%s, ratio=%d); "
                "answers may degrade: raise the ratio, use positions='compact', or split the text into units",
                end_position, self._max_positions, self.config.positions, self.config.ratio)

    # -- generation ---------------------------------------------------------------------------------------------
    def _generate(self, prompts: list[list[int]], max_new_tokens: int, **sampling: Any) -> list[list[int]]:
        tok = self.tokenizer
        eos = {tok.eos_token_id} if tok.eos_token_id is not None else set()
        gen_eos = getattr(self.model.generation_config, "eos_token_id", None)
        eos |= set(gen_eos) if isinstance(gen_eos, list) else ({gen_eos} if gen_eos is not None else set())
        width = max(len(p) for p in prompts)
        self._check_sliding(self.entries + width + max_new_tokens)
        # the last token fed to the model is generated token max_new_tokens - 1, at next_position + width + that
        self._check_range(self.next_position + width + max(max_new_tokens - 1, 0), "decoding the question")
        return decode_after_cache(self.model, self.cache, self.next_position, prompts,
                                  max_new_tokens=max_new_tokens, eos_ids=eos, pad_id=tok.pad_token_id, **sampling)

    # -- persistence --------------------------------------------------------------------------------------------
    def header(self) -> dict:
        h = super().header()
        h.update(entries=self.entries, next_position=self.next_position, positions=self.config.positions,
                 ratio=self.config.ratio, window=self.config.window, raw_tokens=self.stats.raw_tokens,
                 dtype=str(self.model.dtype).removeprefix("torch."))
        return h

    def export(self) -> "MemoryTensors":
        from memorag_core.store.memory_file import MemoryTensors

        keys = [layer.keys[0] for layer in self.cache.layers]  # each (kv_heads, entries, d)
        values = [layer.values[0] for layer in self.cache.layers]  # each (kv_heads, entries, d)
        offsets = self.offsets
        extra = {f"offsets.{i}": o[0] for i, o in enumerate(offsets)}  # each (kv_heads, entries) int32
        return MemoryTensors(keys=keys, values=values, header=self.header(), extra=extra)

    def import_tensors(self, m: "MemoryTensors") -> None:
        from memorag_core.errors import CorruptArtifactError

        cfg = self.model.config.get_text_config()
        layers = cfg.num_hidden_layers
        kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        if len(m.keys) != layers or len(m.values) != layers:
            raise CorruptArtifactError(f"memory has {len(m.keys)} layers, the model has {layers}")
        self._restore_header(m.header)
        entries = int(m.header["entries"])
        for i, (k, v) in enumerate(zip(m.keys, m.values)):
            if k.shape != v.shape or k.dim() != 3 or k.shape[0] != kv_heads or k.shape[1] != entries:
                raise CorruptArtifactError(
                    f"memory layer {i} has K {tuple(k.shape)} / V {tuple(v.shape)}; expected "
                    f"({kv_heads}, {entries}, head_dim)")
        # files written before attention pointers have no offsets: they load, and pointers are unavailable
        offsets = [m.extra.get(f"offsets.{i}") for i in range(layers)]
        known = all(o is not None and tuple(o.shape) == (kv_heads, entries) for o in offsets)
        device, dtype = self.model.device, self.model.dtype
        cache = kv_buffer.memory_cache(layers)
        for layer, k, v, o in zip(cache.layers, m.keys, m.values, offsets):
            # no copy when the tensors already fit (a memory-mapped file on the CPU): appending grows a copy later
            layer.adopt(k[None].to(device, dtype), v[None].to(device, dtype),
                        o.to(device=device, dtype=torch.int32)[None] if known else None)
        self.cache = cache
        self._row = _Row(entries=entries, next_position=int(m.header["next_position"]),
                         source_tokens=int(m.header.get("raw_tokens", 0)))
        self._warned_range = False
