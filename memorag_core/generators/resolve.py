"""Which generator a bulk job uses: ``resolve_generator`` turns a spec (``auto``, ``memory``, ``vllm:``, ``hf:PATH``,
``openai:MODEL@URL``) into what the actors load, the model name the tables record, and the identity that enters
content keys. ``auto`` picks vLLM on the memory model where vLLM is installed and supports it here (a CUDA GPU, or
a head_dim vLLM's CPU backend serves), else the memory model through transformers; the decision is logged.

Imports neither vLLM nor torch at module import (``importlib.util.find_spec`` only checks that vLLM is there).
"""

from __future__ import annotations

import importlib.util
import logging

logger = logging.getLogger(__name__)

VLLM_CPU_HEAD_DIMS = {32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512}
"""head_dim values vLLM's CPU attention backend supports (../shared/ENVIRONMENT.md)."""


def resolve_generator(spec: str, memory_config: dict, memory_ref) -> tuple[str | None, str, list]:
    """``(spec for the actors (None = memory model), model name for the tables, identity for content keys)``.

    The identity is the concrete model, never the engine that ``auto`` picked on this machine: the memory model
    through transformers (``memory``) and through vLLM (``vllm:``) are both ``["model", id, revision]``, so a run
    from a machine with or without vLLM finds the summaries staged by the other. Another spec is its own identity.
    """
    mem_id = memory_ref.id if memory_ref else str(memory_config.get("model"))
    mem_rev = memory_ref.revision if memory_ref else None
    if spec == "auto":
        spec = "memory"
        if importlib.util.find_spec("vllm") is not None:
            head_dim = _head_dim(memory_config.get("model"))
            if head_dim in VLLM_CPU_HEAD_DIMS or _has_cuda():
                spec = "vllm:" + (memory_config.get("model") or "")
            else:
                logger.info("generator auto: vLLM is installed but head_dim %s is not supported here; transformers",
                            head_dim)
        logger.info("generator auto -> %s", spec)
    if spec == "memory":
        return None, mem_id, ["model", mem_id, mem_rev]
    if spec.startswith("vllm:") and (not spec[5:] or spec[5:] == memory_config.get("model")):
        return spec, f"vllm:{mem_id}", ["model", mem_id, mem_rev]
    return spec, spec, ["spec", spec]


def _head_dim(model: str | None) -> int | None:
    try:
        from transformers import AutoConfig

        from memorag_core.models import resolve_lm

        cfg = AutoConfig.from_pretrained(resolve_lm(model))
        return int(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)
    except Exception as exc:  # noqa: BLE001 - unknown: let transformers generate
        logger.info("cannot read the memory model's head_dim (%s)", exc)
        return None


def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:  # pragma: no cover
        return False
