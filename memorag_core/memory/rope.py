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
                                   (:func:`position_limit`); the memory refuses to read or decode past it, with
                                   any ``positions`` setting (the memory's keys and later queries would use
                                   different frequencies)
layers without rotary (SmolLM3     SmolLM3 skips rotary on the layers of ``no_rope_layers``; Cohere2, EXAONE-4 (with
``no_rope_layers``; Cohere2 and    a sliding window) and Cohere2-MoE rotate only their sliding layers. Found per layer
EXAONE-4 ``layer_types``)          by a probe, never from the family's name (:func:`probe_rotary_layers`); the
                                   keys of a layer without rotary are not moved
================================  ================================================================================

Refused at construction (:func:`check_model`, :class:`~memorag_core.errors.UnsupportedModelError`): attention
outside transformers' ``AttentionInterface`` (scores cannot be recorded), attention sinks, attention-logit
softcapping (the SDPA kernels drop it), sliding-window layers whose window cannot hold one memory window,
multi-head latent attention (DeepSeek-V2/V3: ``kv_lora_rank`` in the config), and (when keys must move) no rotary
embedding, no ``apply_rotary_pos_emb`` beside it, a partial rotary that the attention applies to a channel slice
itself (Phi, Persimmon), or a layer whose keys move with position in a way that is neither the model's rotation
nor none. Sliding windows that can hold
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


def position_limit(config: Any) -> int | None:
    """The position (a sequence length) past which a length-dependent RoPE scaling (``dynamic``, ``longrope``)
    switches frequencies, from a text config; ``None`` when the frequencies never change.

    transformers recomputes the frequencies of such a rotary module from the longest position of each forward
    (``dynamic_rope_update``): a memory read window by window, or a question decoded after it, would mix keys and
    queries rotated with different frequencies once a forward passes this length. Per layer type:
    ``original_max_position_embeddings`` of the rope parameters, else of the config, else
    ``max_position_embeddings``; the smallest over layer types.
    """
    limits = []
    for params in _rope_types(config).values():
        if params.get("rope_type", "default") in _LENGTH_DEPENDENT:
            limits.append(int(params.get("original_max_position_embeddings")
                              or getattr(config, "original_max_position_embeddings", 0)
                              or config.max_position_embeddings))
    return min(limits) if limits else None


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
        fixed_until: positions up to which the frequencies are fixed (``None``: always), :func:`position_limit`.
        rotary_layers: per decoder layer, whether the model rotates that layer's keys (:func:`probe_rotary_layers`);
            :meth:`rotate` leaves the keys of the other layers as they are.
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
        self.rotary_layers = [True] * cfg.num_hidden_layers
        first = 0
        cos, _ = self._cos_sin(torch.zeros(1, 1, dtype=torch.long), first)
        self.rotary_dim = int(cos.shape[-1])
        try:
            self.layout = self._probe_layout(first)
        except RuntimeError as exc:  # the family's function takes the rotary channels only
            raise UnsupportedModelError(
                f"{type(model).__name__}: partial rotary ({self.rotary_dim} of {self.head_dim} channels) is applied "
                f"by the attention to a channel slice itself (as Phi and Persimmon do), not by "
                f"`{type(module).__module__}.apply_rotary_pos_emb` on whole keys, so kept keys cannot be re-rotated "
                f"exactly ({exc}); use positions='original' (keys never move) or ratio 1") from exc
        self.fixed_until = position_limit(cfg)
        self.rotary_layers = probe_rotary_layers(model, self)
        still = [i for i, r in enumerate(self.rotary_layers) if not r]
        logger.info("rotary keys: %s layout, rotary_dim %d of %d, %s%s%s", self.layout, self.rotary_dim,
                    self.head_dim, "per-layer types" if self._takes_layer_type else "one module",
                    f", frequencies fixed below position {self.fixed_until}" if self.fixed_until else "",
                    f", no rotary on layers {still}" if still else "")

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

    def _probe_layout(self, layer_idx: int) -> str:
        """``half`` if channel 0 pairs with channel rotary_dim/2, ``interleaved`` if with channel 1."""
        k = torch.zeros(1, 1, 1, self.head_dim)
        k[..., 0] = 1.0
        out = self._rotate_layer(k, torch.ones(1, 1, 1, dtype=torch.long), layer_idx)[0, 0, 0]  # (d,)
        moved = [i for i in range(1, self.head_dim) if abs(float(out[i])) > 1e-6]
        return "interleaved" if moved[:1] == [1] else "half"

    def rotate(self, keys: torch.Tensor, delta: torch.Tensor, layer_idx: int) -> torch.Tensor:
        """Keys (b, kv_heads, n, d) rotated by ``delta`` (b, kv_heads, n) positions; same dtype as ``keys``.

        Computed in float32 (cos/sin and the products) and cast back, so bf16 keys lose nothing extra. A layer
        that the model does not rotate (``rotary_layers[layer_idx]`` false) gets its keys back unchanged.
        """
        if not self.rotary_layers[layer_idx]:
            return keys
        return self._rotate_layer(keys, delta, layer_idx)

    def _rotate_layer(self, keys: torch.Tensor, delta: torch.Tensor, layer_idx: int) -> torch.Tensor:
        """:meth:`rotate` with the rotary module of ``layer_idx``, whether or not the model rotates that layer."""
        b, heads, n, d = keys.shape
        cos, sin = self._cos_sin(delta.reshape(1, b * heads * n).to(keys.device), layer_idx)  # (1, bhn, rd)
        flat = keys.reshape(1, 1, b * heads * n, d).float()  # (1, 1, bhn, d): one "head", every entry a position
        _, rotated = self._apply(flat, flat, cos, sin)  # the family's own layout and partial rotary
        return rotated.reshape(b, heads, n, d).to(keys.dtype)


_PROBE_POSITION = 97  # far enough that every channel but the slowest turns visibly, below any scaling limit
_PROBE_TOLERANCE = 0.05  # relative error: bf16 keys rotate within ~1e-2, a missed rotation is off by O(1)


@torch.no_grad()
def probe_rotary_layers(model: Any, rotation: KeyRotation) -> list[bool]:
    """Per decoder layer, whether the model rotates its keys; refuse a layer whose keys move otherwise.

    One token read alone at position 0 and at position P: attention over a single key returns that key's value
    exactly, so every layer's input is the same at both positions, and a layer's key at P is either its key at 0
    turned by P positions (the layer rotates) or the key at 0 itself (it does not: SmolLM3's ``no_rope_layers``,
    the full-attention layers of Cohere2 and EXAONE-4). Two one-token forwards, whatever the family.

    Raises:
        UnsupportedModelError: a layer whose key at P is neither (e.g. absolute position embeddings).
    """
    from transformers import DynamicCache

    cfg = model.config.get_text_config()
    pos = _PROBE_POSITION if not rotation.fixed_until else min(_PROBE_POSITION, rotation.fixed_until - 1)
    device = model.device
    token = torch.tensor([[int(getattr(cfg, "bos_token_id", None) or 1) % cfg.vocab_size]], device=device)

    def keys_at(p: int) -> list[torch.Tensor]:
        cache = DynamicCache()
        model(input_ids=token, position_ids=torch.tensor([[p]], device=device), past_key_values=cache, use_cache=True)
        return [layer.keys for layer in cache.layers]  # each (1, kv_heads, 1, d)

    at_0, at_p = keys_at(0), keys_at(pos)
    if len(at_0) != cfg.num_hidden_layers:
        raise UnsupportedModelError(
            f"{type(model).__name__}: its cache has {len(at_0)} attention layers for {cfg.num_hidden_layers} decoder "
            "layers, so the memory cannot tell which keys to re-rotate")
    rotates = []
    for i, (k0, kp) in enumerate(zip(at_0, at_p)):
        delta = torch.full(k0.shape[:3], pos, dtype=torch.long)  # (1, kv_heads, 1)
        turned = rotation._rotate_layer(k0, delta, i).float()
        norm = float(kp.float().norm()) or 1.0
        err_rot = float((turned - kp.float()).norm()) / norm
        err_none = float((k0.float() - kp.float()).norm()) / norm
        if err_none <= _PROBE_TOLERANCE:
            rotates.append(False)
        elif err_rot <= _PROBE_TOLERANCE:
            rotates.append(True)
        else:
            raise UnsupportedModelError(
                f"{type(model).__name__}: the keys of layer {i} change with position in a way that is neither its "
                f"rotary embedding (relative error {err_rot:.3f}) nor none ({err_none:.3f}), so kept keys cannot be "
                "moved exactly; use positions='original' or ratio 1")
    return rotates


@dataclass
class ModelSupport:
    """What a KV memory learned about a model at construction.

    Attributes:
        sliding_window: smallest sliding window of any layer (``None``: every layer attends to everything).
        sliding_layers: indices of the sliding-window layers.
        rotation: the key re-rotation (``None`` when keys never move: positions='original' or ratio 1).
        position_limit: :func:`position_limit` of the model (``None``: no length-dependent RoPE scaling); no
            forward (reading or decoding) may reach past it.
    """

    sliding_window: int | None
    sliding_layers: list[int]
    rotation: KeyRotation | None
    position_limit: int | None = None


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
    latent = getattr(cfg, "kv_lora_rank", None)
    if latent:
        raise UnsupportedModelError(
            f"{name}: multi-head latent attention (kv_lora_rank={latent}, as DeepSeek-V2/V3) is not supported: its "
            "cache holds keys decompressed per head with rotary on a separate channel slice, so a memory would be "
            "neither compact nor movable")
    sw, layers = sliding_layers(model.config)
    if sw is not None and sw <= window:
        raise UnsupportedModelError(
            f"{name}: sliding-window attention ({sw} tokens, layers {layers[:8]}{'...' if len(layers) > 8 else ''}) "
            f"cannot hold one memory window of {window} tokens plus its memory; use a model without sliding "
            "layers or a smaller window")
    rotation = KeyRotation(model) if needs_rotation else None
    return ModelSupport(sliding_window=sw, sliding_layers=layers, rotation=rotation, position_limit=position_limit(cfg))
