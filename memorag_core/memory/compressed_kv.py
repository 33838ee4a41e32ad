"""``CompressedKVMemory``: training-free compressed KV memory for any Hugging Face causal LM.

The text is prefilled in windows of ``window`` tokens. Each window attends to the memory so far plus itself;
then, per layer and per KV head, the ``ceil(w / ratio)`` window entries that the window's last ``obs_window``
tokens attend to most are kept and the rest is forgotten (SnapKV-style scoring, see ``scoring.py``). The
memory after n windows therefore holds ``prefix + sum ceil(w_i / ratio)`` entries per layer and KV head,
whatever the text length.

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
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from memorag_core.memory import scoring
from memorag_core.memory.base import Memory
from memorag_core.memory.kv_decode import decode_after_cache

if TYPE_CHECKING:
    from memorag_core.store.memory_file import MemoryTensors

logger = logging.getLogger(__name__)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """The RoPE helper: (..., d) -> (..., d) with halves swapped and the first negated."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class CompressedKVMemory(Memory):
    """Windowed prefill that keeps ``ceil(window/ratio)`` entries per window, layer and KV head."""

    kind: ClassVar[str] = "compressed_kv"

    def __init__(self, config, model=None, tokenizer=None) -> None:
        super().__init__(config, model, tokenizer)
        # Our attention implementation records scores for compression and decodes after the memory without
        # copying it (memorag_core/memory/attention.py); otherwise it is plain SDPA.
        self.model.set_attn_implementation(scoring.register())
        max_pos = getattr(self.model.config, "max_position_embeddings", None)
        self._max_positions = int(max_pos) if max_pos else None

    # -- state --------------------------------------------------------------------------------------------------
    def _reset_state(self) -> None:
        from transformers import DynamicCache

        self.cache = DynamicCache()
        self.entries = 0  # kept entries per layer and KV head
        self.next_position = 0  # rotary position of the next token
        self._warned_range = False
        # Attention pointers: per layer, the source token offset of every kept entry, (1, kv_heads, entries) int32
        # (-1 for the uncompressed prompt head). Stored in the memory file as ``extra["offsets.<layer>"]``.
        self.offsets: list[torch.Tensor] = []
        self._source_tokens = 0  # text tokens read so far (offset of the next window's first token)
        self._window_source = -1

    def _state_entries(self) -> int:
        return self.entries

    def _state_nbytes(self) -> int:
        return sum(layer.keys.numel() * layer.keys.element_size() * 2 for layer in self.cache.layers
                   if layer.keys is not None)

    # -- reading ------------------------------------------------------------------------------------------------
    def _ingest(self, token_ids: list[int], *, is_prefix: bool) -> None:
        from tqdm.auto import tqdm

        window = self.config.window
        starts = range(0, len(token_ids), window)
        bar = tqdm(starts, desc="memorizing", unit="window", disable=is_prefix or not self.show_progress)
        for start in bar:
            self._window_source = -1 if is_prefix else self._source_tokens
            ids = token_ids[start:start + window]
            self._read_window(ids, compress=not is_prefix and self.config.ratio > 1)
            if not is_prefix:
                self._source_tokens += len(ids)

    @torch.no_grad()
    def _read_window(self, ids: list[int], compress: bool) -> None:
        """Prefill one window after the memory; if ``compress``, keep the best ``ceil(w/ratio)`` entries."""
        w = len(ids)
        mem = self.entries
        device = self.model.device
        input_ids = torch.tensor([ids], dtype=torch.long, device=device)  # (1, w)
        positions = torch.arange(self.next_position, self.next_position + w, device=device)[None]  # (1, w)
        self._check_range(self.next_position + w)
        if compress:
            with scoring.capture_scores(self.config.obs_window) as scores:
                self.model(input_ids=input_ids, position_ids=positions, past_key_values=self.cache,
                           use_cache=True, logits_to_keep=1)
            keep = math.ceil(w / self.config.ratio)
            for layer_idx, layer in enumerate(self.cache.layers):
                window_scores = self.score(scores[layer_idx][:, :, mem:], layer_idx)  # (1, kv_heads, w)
                kept = self._keep_top(layer, mem, window_scores, keep)  # (1, kv_heads, keep) window offsets
                self._note_offsets(layer_idx, kept)
            self.entries = mem + keep
            self.next_position = self.next_position + (keep if self.config.positions == "compact" else w)
        else:
            self.model(input_ids=input_ids, position_ids=positions, past_key_values=self.cache, use_cache=True,
                       logits_to_keep=1)
            heads = self.cache.layers[0].keys.shape[1]
            every = torch.arange(w, device=device)[None, None].expand(1, heads, w)  # (1, kv_heads, w)
            for layer_idx in range(len(self.cache.layers)):
                self._note_offsets(layer_idx, every)
            self.entries = mem + w
            self.next_position += w

    def score(self, window_scores: torch.Tensor, layer_idx: int) -> torch.Tensor:
        """How much each window entry is worth keeping: (1, kv_heads, w) -> (1, kv_heads, w).

        Default: the observation window's attention mass, max-pooled along the sequence so that the neighbours
        of a strongly attended token survive with it. Override this (only this) for another criterion.
        """
        k = self.config.pool_kernel
        if k > 1 and window_scores.shape[-1] >= k:
            window_scores = torch.nn.functional.max_pool1d(window_scores, kernel_size=k, stride=1, padding=k // 2)
        return window_scores

    def _note_offsets(self, layer_idx: int, window_offsets: torch.Tensor) -> None:
        """Append the source token offsets of a window's kept entries (1, kv_heads, n) to layer ``layer_idx``."""
        start = self._window_source
        off = (window_offsets + start if start >= 0 else torch.full_like(window_offsets, -1)).to(torch.int32).cpu()
        if layer_idx < len(self.offsets):
            self.offsets[layer_idx] = torch.cat([self.offsets[layer_idx], off], dim=2)  # (1, kv_heads, entries)
        else:
            self.offsets.append(off)

    def _keep_top(self, layer: Any, mem: int, window_scores: torch.Tensor, keep: int) -> torch.Tensor:
        """Replace the layer's window entries by the ``keep`` best per KV head, in their original order; return
        their window offsets (1, kv_heads, keep)."""
        keys, values = layer.keys, layer.values  # (1, kv_heads, mem + w, d)
        idx = window_scores.topk(keep, dim=-1).indices.sort(dim=-1).values  # (1, kv_heads, keep)
        gather = idx[..., None].expand(-1, -1, -1, keys.shape[-1])  # (1, kv_heads, keep, d)
        kept_k = keys[:, :, mem:].gather(2, gather)  # (1, kv_heads, keep, d)
        kept_v = values[:, :, mem:].gather(2, gather)  # (1, kv_heads, keep, d)
        if self.config.positions == "compact":
            # Token at window offset idx sat at position next_position + idx; it moves to next_position + rank.
            delta = torch.arange(keep, device=idx.device) - idx  # (1, kv_heads, keep), <= 0
            kept_k = self._rerotate(kept_k, delta)
        layer.keys = torch.cat([keys[:, :, :mem], kept_k], dim=2)  # (1, kv_heads, mem + keep, d)
        layer.values = torch.cat([values[:, :, :mem], kept_v], dim=2)  # (1, kv_heads, mem + keep, d)
        return idx

    def _rerotate(self, keys: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """Rotate RoPE keys (1, kv_heads, n, d) by ``delta`` positions (1, kv_heads, n)."""
        rotary = self.model.model.rotary_emb
        _, heads, n, d = keys.shape
        flat = delta.reshape(1, heads * n)  # (1, heads*n)
        cos, sin = rotary(keys.reshape(1, heads * n, d), position_ids=flat)  # (1, heads*n, d) each
        scale = getattr(rotary, "attention_scaling", 1.0) or 1.0  # yarn-style scaling is not part of a rotation
        cos = (cos / scale).reshape(1, heads, n, d).to(keys.dtype)
        sin = (sin / scale).reshape(1, heads, n, d).to(keys.dtype)
        return keys * cos + rotate_half(keys) * sin  # (1, kv_heads, n, d)

    def _check_range(self, end_position: int) -> None:
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
        extra = {}
        if len(self.offsets) == len(keys) and all(o.shape[2] == self.entries for o in self.offsets):
            extra = {f"offsets.{i}": o[0] for i, o in enumerate(self.offsets)}  # each (kv_heads, entries) int32
        return MemoryTensors(keys=keys, values=values, header=self.header(), extra=extra)

    def import_tensors(self, m: "MemoryTensors") -> None:
        from transformers import DynamicCache

        from memorag_core.errors import CorruptArtifactError

        cfg = self.model.config
        layers = cfg.num_hidden_layers
        kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        if len(m.keys) != layers or len(m.values) != layers:
            raise CorruptArtifactError(f"memory has {len(m.keys)} layers, the model has {layers}")
        self._restore_header(m.header)
        cache = DynamicCache()
        for i, (k, v) in enumerate(zip(m.keys, m.values)):
            if k.shape != v.shape or k.dim() != 3 or k.shape[0] != kv_heads or k.shape[1] != m.header["entries"]:
                raise CorruptArtifactError(
                    f"memory layer {i} has K {tuple(k.shape)} / V {tuple(v.shape)}; expected "
                    f"({kv_heads}, {m.header['entries']}, head_dim)")
            cache.update(k[None].to(self.model.device, self.model.dtype),
                         v[None].to(self.model.device, self.model.dtype), i)
        self.cache = cache
        self.entries = int(m.header["entries"])
        self.next_position = int(m.header["next_position"])
        self._warned_range = False
        # files written before attention pointers have no offsets: they load, and pointers are unavailable
        offsets = [m.extra.get(f"offsets.{i}") for i in range(layers)]
        self.offsets = ([o.to(torch.int32).cpu()[None] for o in offsets]
                        if all(o is not None and tuple(o.shape) == (kv_heads, self.entries) for o in offsets) else [])
        self._source_tokens = int(m.header.get("raw_tokens", 0))
