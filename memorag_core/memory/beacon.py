"""``BeaconMemory``: MemoRAG's released memory models through the checkpoint's own (remote) code.

``TommyChien/memorag-qwen2-7b-inst`` and ``...-mistral-7b-inst`` ship modelling code that compresses the context
into beacon activations while reading. We drive that code through its public contract, as upstream does:

* load with ``trust_remote_code=True`` and ``beacon_ratio=[ratio]`` passed to ``from_pretrained``;
* ``model.memory.reset()`` forgets; ``model(input_ids)`` reads (the memory accumulates across calls, which is how
  ``append`` continues without re-reading); ``model.memory.export()`` returns the state as a dict, and
  ``model.memory.reset(**state)`` restores it before each generation.

Storage: the exported state is flattened into named tensors plus a JSON layout (never pickled). Its per-layer
``(key, value)`` pairs, the part that grows with the text, become the memory file's K/V layers; every other
tensor goes to ``extra`` and every non-tensor leaf into the header. The weights cannot be fetched here, so this
class is contract-tested against a small checkpoint folder with its own remote code (tests/memorag_core/memory).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from memorag_core.errors import CorruptArtifactError, InvalidInputError
from memorag_core.memory.base import Memory
from memorag_core.models import LoadOptions

if TYPE_CHECKING:
    from memorag_core.store.memory_file import MemoryTensors


def _is_kv_layers(x: Any) -> bool:
    """A list of per-layer (key, value) pairs of 4-D tensors (batch, heads, entries, head_dim)."""
    return (isinstance(x, (list, tuple)) and len(x) > 0 and all(
        isinstance(p, (list, tuple)) and len(p) == 2 and all(isinstance(t, torch.Tensor) and t.dim() == 4 for t in p)
        for p in x))


def flatten_state(state: dict) -> tuple[str | None, list, list, dict[str, torch.Tensor], Any]:
    """Split a beacon state into (kv field name, keys, values, extra tensors, JSON layout).

    keys/values: one (heads, entries, head_dim) tensor per layer (batch 1 squeezed). The layout mirrors the state
    with tensors replaced by ``{"tensor": name}`` and the KV field by ``{"kv_layers": n}``.
    """
    kv_field = next((k for k, v in state.items() if _is_kv_layers(v)), None)
    keys, values, extra = [], [], {}

    def walk(x: Any, path: str) -> Any:
        if isinstance(x, torch.Tensor):
            name = path.replace("/", ".")
            extra[name] = x
            return {"tensor": name}
        if isinstance(x, dict):
            return {"dict": {k: walk(v, f"{path}/{k}") for k, v in x.items()}}
        if isinstance(x, (list, tuple)):
            return {"list" if isinstance(x, list) else "tuple": [walk(v, f"{path}/{i}") for i, v in enumerate(x)]}
        if x is None or isinstance(x, (bool, int, float, str)):
            return {"value": x}
        raise InvalidInputError(f"beacon state field {path!r} has type {type(x).__name__}, which cannot be stored")

    layout = {}
    for k, v in state.items():
        if k == kv_field:
            for key, value in v:
                if key.shape[0] != 1:
                    raise InvalidInputError(f"beacon state {k!r} has batch {key.shape[0]}; expected 1")
                keys.append(key[0])  # (heads, entries, head_dim)
                values.append(value[0])  # (heads, entries, head_dim)
            layout[k] = {"kv_layers": len(v)}
        else:
            layout[k] = walk(v, k)
    return kv_field, keys, values, extra, layout


def unflatten_state(layout: dict, keys: list, values: list, extra: dict[str, torch.Tensor]) -> dict:
    """Inverse of :func:`flatten_state`."""

    def build(node: dict) -> Any:
        (tag, val), = node.items()
        if tag == "tensor":
            if val not in extra:
                raise CorruptArtifactError(f"beacon memory file lacks tensor {val!r}")
            return extra[val]
        if tag == "dict":
            return {k: build(v) for k, v in val.items()}
        if tag in ("list", "tuple"):
            items = [build(v) for v in val]
            return items if tag == "list" else tuple(items)
        return val

    state = {}
    for k, node in layout.items():
        if "kv_layers" in node:
            state[k] = [(kk[None], vv[None]) for kk, vv in zip(keys, values)]  # each (1, heads, entries, d)
        else:
            state[k] = build(node)
    return state


class BeaconMemory(Memory):
    """Memory of a checkpoint with built-in beacon compression (its remote code does the compressing)."""

    kind: ClassVar[str] = "beacon"

    def _load_model(self) -> tuple[Any, Any]:
        from memorag_core.models import load_causal_lm

        options = LoadOptions(**{**self.config.load.__dict__, "trust_remote_code": True})
        try:
            return load_causal_lm(self.config.model, options, beacon_ratio=[self.config.ratio])
        except TypeError as exc:  # a plain architecture rejects the beacon_ratio argument
            if "beacon_ratio" not in str(exc):
                raise
            raise InvalidInputError(
                f"model {self.model_id!r} is not a beacon checkpoint (its code takes no beacon_ratio): "
                "use kind='compressed_kv'") from None

    def _beacon(self) -> Any:
        mem = getattr(self.model, "memory", None)
        if mem is None or not callable(getattr(mem, "reset", None)) or not callable(getattr(mem, "export", None)):
            raise InvalidInputError(
                f"model {self.model_id!r} has no beacon memory (model.memory.reset/export); it is not a beacon "
                "checkpoint: use kind='compressed_kv'")
        return mem

    def _reset_state(self) -> None:
        self.state: dict | None = None
        if getattr(self, "model", None) is not None:
            self._beacon().reset()

    def _restore(self) -> None:
        mem = self._beacon()
        if self.state is None:
            mem.reset()
        else:
            mem.reset(**self.state)

    @torch.no_grad()
    def _ingest(self, token_ids: list[int], *, is_prefix: bool) -> None:
        self._restore()
        ids = torch.tensor([token_ids], dtype=torch.long, device=self.model.device)  # (1, n)
        self.model(input_ids=ids, attention_mask=torch.ones_like(ids))
        self.state = self._beacon().export()

    @torch.no_grad()
    def _generate(self, prompts: list[list[int]], max_new_tokens: int, **sampling: Any) -> list[list[int]]:
        outs = []
        temperature = sampling.get("temperature") or 0.0
        for p in prompts:  # the remote code keeps one memory state: one prompt at a time
            self._restore()
            ids = torch.tensor([p], dtype=torch.long, device=self.model.device)  # (1, L)
            out = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                      max_new_tokens=max_new_tokens, do_sample=temperature > 0,
                                      temperature=temperature or None, top_p=sampling.get("top_p"),
                                      repetition_penalty=sampling.get("repetition_penalty"),
                                      pad_token_id=self.tokenizer.pad_token_id)
            outs.append(out[0, ids.shape[1]:].tolist())
        self._restore()
        return outs

    def _flat(self):
        return flatten_state(self.state) if self.state is not None else (None, [], [], {}, {})

    def _state_nbytes(self) -> int:
        _, keys, values, extra, _ = self._flat()
        return sum(t.numel() * t.element_size() for t in (*keys, *values, *extra.values()))

    def _state_entries(self) -> int:
        _, keys, _, _, _ = self._flat()
        if keys:
            return int(keys[0].shape[1])
        return math.ceil(self.stats.raw_tokens / self.config.ratio)

    def export(self) -> "MemoryTensors":
        from memorag_core.store.memory_file import MemoryTensors

        kv_field, keys, values, extra, layout = self._flat()
        if kv_field is None:
            raise InvalidInputError("the beacon state holds no per-layer (key, value) list; cannot store it")
        header = self.header()
        header.update(beacon_layout=layout, ratio=self.config.ratio, raw_tokens=self.stats.raw_tokens)
        return MemoryTensors(keys=keys, values=values, header=header, extra=extra)

    def import_tensors(self, m: "MemoryTensors") -> None:
        self._restore_header(m.header)
        layout = m.header.get("beacon_layout")
        if not isinstance(layout, dict):
            raise CorruptArtifactError("memory file has no beacon_layout: it was not written by a beacon memory")
        dev = self.model.device
        self.state = unflatten_state(layout, [k.to(dev) for k in m.keys], [v.to(dev) for v in m.values],
                                     {n: t.to(dev) for n, t in m.extra.items()})
        self._restore()
