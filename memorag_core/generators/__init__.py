"""Generator backends behind one interface (:class:`Generator`), and :func:`load_generator` to pick one by spec.

Backends: :class:`HFGenerator` (transformers; also the memory model itself through ``HFGenerator.from_model``),
:class:`VLLMGenerator` (vLLM's offline engine, optional extra), :class:`OpenAIGenerator` / :class:`Agent` (any
OpenAI-compatible HTTP endpoint: OpenAI, Azure, DeepSeek, vLLM's server), and :class:`CustomizedGenerator`
(upstream's ``customized_gen_model``: any object with ``generate(prompt, max_new_tokens) -> list[str]``).

Importing this package imports neither vLLM nor torch; each backend imports its engine when built.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from memorag_core.errors import InvalidInputError
from memorag_core.generators.base import (
    CustomizedGenerator,
    GenerationConfig,
    Generator,
    stream_until_stop,
    truncate_at_stop,
)
from memorag_core.generators.hf import HFGenerator
from memorag_core.generators.openai_http import Agent, OpenAIGenerator
from memorag_core.generators.vllm_engine import VLLMGenerator
from memorag_core.models import LoadOptions

logger = logging.getLogger(__name__)

__all__ = [
    "Agent",
    "CustomizedGenerator",
    "GenerationConfig",
    "Generator",
    "HFGenerator",
    "OpenAIGenerator",
    "VLLMGenerator",
    "load_generator",
    "stream_until_stop",
    "truncate_at_stop",
]


def _vllm_options(options: LoadOptions) -> dict[str, Any]:
    """The LoadOptions that have a vLLM engine argument (dtype, remote code, download folder)."""
    kwargs: dict[str, Any] = {}
    if options.dtype != "auto":
        kwargs["dtype"] = options.dtype
    if options.trust_remote_code:
        kwargs["trust_remote_code"] = True
    if options.cache_dir:
        kwargs["download_dir"] = options.cache_dir
    return kwargs


def load_generator(spec: str | None | Generator | object, options: LoadOptions = LoadOptions(), *,
                   generation: GenerationConfig | None = None, **backend_kwargs: Any) -> Generator:
    """Build a generator from a spec.

    Spec forms:
        * a :class:`Generator`: returned unchanged (``generation`` and ``backend_kwargs`` must then be empty);
        * an object with a callable ``generate`` (upstream ``customized_gen_model``): wrapped in
          :class:`CustomizedGenerator`, called once per prompt;
        * ``None`` or ``"hf:"``: the embedded SmolLM2-135M-Instruct through transformers;
        * ``"hf:<path-or-id>"`` or a plain path/id: :class:`HFGenerator` loaded with ``options``;
        * ``"vllm:<path-or-id>"`` (``"vllm:"`` for the embedded model): :class:`VLLMGenerator`;
        * ``"openai:<model>@<base_url>"`` (or ``"openai:<model>"`` for api.openai.com): :class:`OpenAIGenerator`,
          key from ``OPENAI_API_KEY``.

    Args:
        spec: one of the forms above.
        options: load options for the transformers backend; for vLLM, dtype, trust_remote_code and cache_dir
            (as ``download_dir``) are passed on.
        generation: default sampling settings of the new generator.
        backend_kwargs: extra constructor arguments of the chosen backend (``batch_size``, ``max_model_len``,
            ``api_key``, ...).

    Raises:
        InvalidInputError: an empty spec string, an unknown spec type, or an ``openai:`` spec without a model.
        ModelNotFoundError / OptionalDependencyError: from the chosen backend.
    """
    if isinstance(spec, Generator):
        if generation is not None or backend_kwargs:
            raise InvalidInputError("load_generator got a ready Generator; it takes no generation/backend kwargs")
        return spec
    if spec is None:
        return HFGenerator(None, options, generation=generation, **backend_kwargs)
    if isinstance(spec, str):
        spec = spec.strip()
        if not spec:
            raise InvalidInputError("generator spec is an empty string; use None for the embedded default")
        scheme, sep, rest = spec.partition(":")
        if sep and scheme == "hf":
            logger.info("generator: transformers %s", rest or "(embedded)")
            return HFGenerator(rest or None, options, generation=generation, **backend_kwargs)
        if sep and scheme == "vllm":
            logger.info("generator: vLLM %s", rest or "(embedded)")
            return VLLMGenerator(rest or None, generation=generation, **{**_vllm_options(options), **backend_kwargs})
        if sep and scheme == "openai":
            model, at, base_url = rest.partition("@")
            if not model:
                raise InvalidInputError(f"generator spec {spec!r} names no model; use 'openai:<model>@<base_url>'")
            logger.info("generator: OpenAI-compatible %s at %s", model, base_url or "api.openai.com")
            return OpenAIGenerator(model, base_url=base_url or None, generation=generation, **backend_kwargs)
        # A plain path or hub id. A Windows-style "C:\\..." path is not a scheme either.
        if sep and scheme.isalpha() and len(scheme) > 1 and not os.path.exists(spec):
            raise InvalidInputError(f"unknown generator scheme {scheme!r} in {spec!r}; use hf:, vllm: or openai:")
        return HFGenerator(spec, options, generation=generation, **backend_kwargs)
    if callable(getattr(spec, "generate", None)):
        logger.info("generator: customized model %s", type(spec).__name__)
        return CustomizedGenerator(spec, generation=generation)
    raise InvalidInputError(
        f"generator spec must be None, a str, a Generator or an object with generate(); got {type(spec).__name__}"
    )
