"""Re-rotating kept keys to new rotary positions, for every RoPE family, or refusing the model up front.

A compressed memory with ``positions="compact"`` moves each kept key from its token's position ``p`` to its rank
``p'`` in the memory. RoPE rotates each pair of key channels by ``position * inv_freq``; rotations compose, so
``rope(k, p')`` equals ``rope(rope(k, p), p' - p)``. We therefore rotate stored keys by ``delta = p' - p`` with the
model's *own* rotary module (its frequencies, scaling variants included) and its *own* ``apply_rotary_pos_emb``
(its channel layout), so that the families differ only in what is looked up, never in hand-written formulas:

================================  ================================================================================
half-split (Llama, Qwen, Mistral)  pairs (i, i + d/2); ``apply_rotary_pos_emb`` of the family does it
interleaved (Cohere, GLM)          pairs (2i, 2i + 1); the family's function interleaves its cos/sin itself
partial rotary (Phi-3, GLM)        only the first ``rotary_dim`` channels turn; the family's function passes the rest
per-layer rotary (Gemma-3)         one module, ``forward(x, position_ids, layer_type)``: the layer's type is passed
yarn / llama3 / linear scaling     fixed frequencies; ``attention_scaling`` multiplies cos and sin but is not part of
                                   a rotation, so it is divided out (else every re-rotation rescales the key)
dynamic / longrope                 frequencies switch once a sequence passes ``original_max_position_embeddings``;
                                   below it they are fixed. Supported while positions stay below that limit
                                   (:attr:`KeyRotation.fixed_until`); the memory refuses to go past it
================================  ================================================================================

Refused at construction (:func:`check_model`, :class:`~memorag_core.errors.UnsupportedModelError`): attention
outside transformers' ``AttentionInterface`` (scores cannot be recorded), attention sinks, attention-logit
softcapping (the SDPA kernels drop it), sliding-window layers whose window cannot hold one memory window, and
(when keys must move) no rotary embedding or no ``apply_rotary_pos_emb`` beside it. Sliding windows that can hold
a window are supported until the memory outgrows them (:attr:`ModelSupport.sliding_window`).
"""

from __future__ import annotations

import inspect
import logging
import sys
from dataclasses import dataclass
from typing import Any, Callable

import torch

from memorag_core.errors import UnsupportedModelError

logger = logging.getLogger(__name__)

_LENGTH_DEPENDENT = ("dynamic", "longrope")


def _rope_types(config: Any) -> dict[str | None, dict]:
    """``{layer_type or None: rope parameters}`` of a text config (transformers 5 ``rope_parameters``)."""
    params = getattr(config, "rope_parameters", None) or {}
    if params and all(isinstance(v, dict) for v in params.values()):
        return dict(params)  # per layer type (Gemma-3: sliding_attention / full_attention)
    legacy = getattr(config, "rope_scaling", None) or {}
    return {None: {**legacy, **params}}


class KeyRotation:
    """Rotates stored RoPE keys by per-entry position deltas with the model's own rotary module.

    Attributes:
        layout: ``"half"`` or ``"interleaved"`` (detected once with a probe; for logs and docs).
        rotary_dim: channels that rotate (head_dim unless partial rotary).
        fixed_until: positions up to which the frequencies are fixed (``None``: always).
    """

    def __init__(self, model: Any) -> None:
        cfg = model.config.get_text_config()
        self.config = cfg
        found = [(name, m) for name, m in model.named_modules() if name.split(".")[-1] == "rotary_emb"]
        if not found:
            raise UnsupportedModelError(
                f"{type(model).__name__}: no rotary embedding module (`rotary_emb`) found, so kept keys cannot be "
                "re-rotated to compact positions; use positions='original' or ratio 1")
        # one shared module (Llama, Gemma-3) or one per layer (older remote code): map layer -> module
        self._per_layer: dict[int, Any] = {}
        self._shared = None
        for name, m in found:
            parts = name.split(".")
            idx = next((int(p) for p in parts if p.isdigit()), None)
            if idx is None:
                self._shared = m
            else:
                self._per_layer[idx] = m
        module = self._shared if self._shared is not None else next(iter(self._per_layer.values()))
        family = sys.modules.get(type(module).__module__)
        self._apply: Callable | None = getattr(family, "apply_rotary_pos_emb", None)
        if self._apply is None:
            raise UnsupportedModelError(
                f"{type(model).__name__}: no `apply_rotary_pos_emb` beside {type(module).__name__} in "
                f"{type(module).__module__}, so the key layout (half-split or interleaved) is unknown; use "
                "positions='original' or ratio 1")
        self._takes_layer_type = "layer_type" in inspect.signature(module.forward).parameters
        self._layer_types = list(getattr(cfg, "layer_types", None) or [])
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.head_dim = int(head_dim)
        cos, _ = self._cos_sin(torch.zeros(1, 1, dtype=torch.long), 0)
        self.rotary_dim = int(cos.shape[-1])
        self.layout = self._probe_layout()
        limits = []
        for params in _rope_types(cfg).values():
            if params.get("rope_type", "default") in _LENGTH_DEPENDENT:
                limits.append(int(params.get("original_max_position_embeddings")
                                  or getattr(cfg, "original_max_position_embeddings", 0)
                                  or cfg.max_position_embeddings))
        self.fixed_until = min(limits) if limits else None
        logger.info("rotary keys: %s layout, rotary_dim %d of %d, %s%s", self.layout, self.rotary_dim,
                    self.head_dim, "per-layer types" if self._takes_layer_type else "one module",
                    f", frequencies fixed below position {self.fixed_until}" if self.fixed_until else "")

    def _module(self, layer_idx: int) -> Any:
        return self._per_layer.get(layer_idx, self._shared)

    def _cos_sin(self, positions: torch.Tensor, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin (1, n, rotary_dim) float32 at ``positions`` (1, n), attention scaling divided out."""
        module = self._module(layer_idx)
        x = torch.zeros(1, dtype=torch.float32, device=positions.device)
        kwargs, scale = {}, getattr(module, "attention_scaling", None)
        if self._takes_layer_type:
            layer_type = self._layer_types[layer_idx]
            kwargs["layer_type"] = layer_type
            scale = getattr(module, f"{layer_type}_attention_scaling", scale)
        cos, sin = module(x, positions, **kwargs)  # (1, n, rotary_dim) each
        scale = float(scale) if scale else 1.0  # yarn/longrope magnitude: not part of a rotation
        return cos.float() / scale, sin.float() / scale

    def _probe_layout(self) -> str:
        """``half`` if channel 0 pairs with channel rotary_dim/2, ``interleaved`` if with channel 1."""
        k = torch.zeros(1, 1, 1, self.head_dim)
        k[..., 0] = 1.0
        out = self.rotate(k, torch.ones(1, 1, 1, dtype=torch.long), 0)[0, 0, 0]  # (d,)
        moved = [i for i in range(1, self.head_dim) if abs(float(out[i])) > 1e-6]
        return "interleaved" if moved[:1] == [1] else "half"

    def rotate(self, keys: torch.Tensor, delta: torch.Tensor, layer_idx: int) -> torch.Tensor:
        """Keys (b, kv_heads, n, d) rotated by ``delta`` (b, kv_heads, n) positions; same dtype as ``keys``.

        Computed in float32 (cos/sin and the products) and cast back, so bf16 keys lose nothing extra.
        """
        b, heads, n, d = keys.shape
        cos, sin = self._cos_sin(delta.reshape(1, b * heads * n).to(keys.device), layer_idx)  # (1, bhn, rd)
        flat = keys.reshape(1, 1, b * heads * n, d).float()  # (1, 1, bhn, d): one "head", every entry a position
        _, rotated = self._apply(flat, flat, cos, sin)  # the family's own layout and partial rotary
        return rotated.reshape(b, heads, n, d).to(keys.dtype)


@dataclass
class ModelSupport:
    """What a KV memory learned about a model at construction.

    Attributes:
        sliding_window: smallest sliding window of any layer (``None``: every layer attends to everything).
        sliding_layers: indices of the sliding-window layers.
        rotation: the key re-rotation (``None`` when keys never move: positions='original' or ratio 1).
    """

    sliding_window: int | None
    sliding_layers: list[int]
    rotation: KeyRotation | None


def sliding_layers(config: Any) -> tuple[int | None, list[int]]:
    """(window, layer indices) of sliding-window attention layers, from the text config."""
    cfg = config.get_text_config()
    window = getattr(cfg, "sliding_window", None)
    if not window:
        return None, []
    types = getattr(cfg, "layer_types", None)
    if types:
        layers = [i for i, t in enumerate(types) if t == "sliding_attention"]
    elif getattr(cfg, "use_sliding_window", True):
        layers = list(range(cfg.num_hidden_layers))
    else:
        layers = []
    return (int(window) if layers else None), layers


def check_model(model: Any, *, window: int, needs_rotation: bool) -> ModelSupport:
    """Refuse what a KV memory cannot do correctly on ``model``; return what it must respect.

    Args:
        window: tokens read per memory window (a sliding window must hold at least one window and its memory).
        needs_rotation: kept keys move (compact positions with ratio > 1), so the rotary scheme must be known.

    Raises:
        UnsupportedModelError: naming the missing capability and the model class.
    """
    name = type(model).__name__
    cfg = model.config.get_text_config()
    if not getattr(model, "_supports_attention_backend", False):
        raise UnsupportedModelError(
            f"{name}: its attention does not go through transformers' AttentionInterface, so the memory cannot "
            "record attention scores or read a shared memory")
    if any(isinstance(getattr(m, "sinks", None), torch.Tensor) for m in model.modules()):
        raise UnsupportedModelError(
            f"{name}: attention sinks (learned per-head logits) are not supported: scoring and the memory "
            "attention would ignore them")
    cap = getattr(cfg, "attn_logit_softcapping", None)
    if cap:
        raise UnsupportedModelError(
            f"{name}: attention logit softcapping (attn_logit_softcapping={cap}) is not supported: the SDPA "
            "kernels the memory uses cannot apply it")
    sw, layers = sliding_layers(model.config)
    if sw is not None and sw <= window:
        raise UnsupportedModelError(
            f"{name}: sliding-window attention ({sw} tokens, layers {layers[:8]}{'...' if len(layers) > 8 else ''}) "
            f"cannot hold one memory window of {window} tokens plus its memory; use a model without sliding "
            "layers or a smaller window")
    rotation = KeyRotation(model) if needs_rotation else None
    return ModelSupport(sliding_window=sw, sliding_layers=layers, rotation=rotation)
