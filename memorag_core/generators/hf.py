"""Hugging Face transformers backend: batched, left-padded ``model.generate`` with the tokenizer's chat template.

:meth:`HFGenerator.from_model` reuses an already loaded model and tokenizer; that is how the memory model itself
becomes the generator (no second copy of the weights). Streaming runs ``generate`` in a background thread feeding a
``transformers.TextIteratorStreamer``; leaving the stream early stops the generation at the next token.

A tokenizer without a chat template gets the prompt as raw text (logged once), as base models expect.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from typing import Any

from memorag_core.errors import InvalidInputError
from memorag_core.generators.base import GenerationConfig, Generator, chat_prompt
from memorag_core.models import LoadOptions, load_causal_lm

logger = logging.getLogger(__name__)


class HFGenerator(Generator):
    """Generate with a transformers causal LM.

    Args:
        model_name_or_path: a local folder or hub id; None for the embedded SmolLM2-135M-Instruct.
        options: how to load the model (dtype, device, ...).
        batch_size: prompts per ``model.generate`` call (> 0); prompts are left-padded within a batch.
        generation: default sampling settings.

    Raises:
        ModelNotFoundError: the model cannot be found or loaded.
        InvalidInputError: batch_size is not a positive int.

    One instance serves one call at a time (torch models are not meant for concurrent generate calls); give each
    Ray actor or Serve replica its own generator.
    """

    def __init__(self, model_name_or_path: str | None = None, options: LoadOptions = LoadOptions(),
                 batch_size: int = 4, *, generation: GenerationConfig | None = None) -> None:
        model, tokenizer = load_causal_lm(model_name_or_path, options)
        self._setup(model, tokenizer, batch_size, generation)

    @classmethod
    def from_model(cls, model: Any, tokenizer: Any, batch_size: int = 4, *,
                   generation: GenerationConfig | None = None) -> "HFGenerator":
        """Wrap an already loaded causal LM and its tokenizer (e.g. the memory model) without copying weights."""
        self = cls.__new__(cls)
        self._setup(model, tokenizer, batch_size, generation)
        return self

    def _setup(self, model: Any, tokenizer: Any, batch_size: int, generation: GenerationConfig | None) -> None:
        Generator.__init__(self, generation)
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
            raise InvalidInputError(f"batch_size must be a positive int, got {batch_size!r}")
        if not callable(getattr(model, "generate", None)):
            raise InvalidInputError(f"from_model needs a transformers generation model, got {type(model).__name__}")
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        if tokenizer.pad_token_id is None:
            # Left padding needs a pad id; the EOS token is the usual stand-in and is masked out anyway.
            tokenizer.pad_token = tokenizer.eos_token
        self._has_template = bool(getattr(tokenizer, "chat_template", None))
        if not self._has_template:
            logger.info("tokenizer has no chat template: prompts are passed as raw text")

    # -- prompt encoding ----------------------------------------------------------------------------------------
    def format_prompt(self, prompt: str) -> str:
        """The text the model sees for one user message: the chat template with a generation prompt."""
        return chat_prompt(self.tokenizer, prompt)

    def _encode(self, prompts: list[str]) -> Any:
        texts = [self.format_prompt(p) for p in prompts]
        # The chat template already holds any BOS token; without a template the tokenizer adds its own.
        enc = self.tokenizer(texts, return_tensors="pt", padding=True, padding_side="left",
                             add_special_tokens=not self._has_template)
        return enc.to(self.model.device)

    def _generate_kwargs(self, config: GenerationConfig) -> dict[str, Any]:
        kwargs: dict[str, Any] = dict(
            max_new_tokens=config.max_new_tokens,
            pad_token_id=self.tokenizer.pad_token_id,
            do_sample=not config.greedy,
        )
        if not config.greedy:
            kwargs["temperature"] = float(config.temperature)
            kwargs["top_p"] = float(config.top_p) if config.top_p is not None else 1.0
        else:
            # Greedy: neutralize sampling knobs from the checkpoint's generation_config (avoids warnings).
            kwargs.update(temperature=None, top_p=None, top_k=None)
        if config.repetition_penalty is not None:
            kwargs["repetition_penalty"] = float(config.repetition_penalty)
        if config.stop:
            # Stop early on the GPU/CPU side too; the exact cut is made on the decoded text by the base class.
            kwargs.update(stop_strings=list(config.stop), tokenizer=self.tokenizer)
        return kwargs

    # -- backend hooks ------------------------------------------------------------------------------------------
    def _generate(self, prompts: list[str], config: GenerationConfig) -> list[str]:
        import torch

        answers: list[str] = []
        kwargs = self._generate_kwargs(config)
        for start in range(0, len(prompts), self.batch_size):
            enc = self._encode(prompts[start:start + self.batch_size])
            with torch.inference_mode():
                out = self.model.generate(**enc, **kwargs)  # (batch, prompt_len + new)
            new_tokens = out[:, enc["input_ids"].shape[1]:]  # (batch, new)
            answers.extend(self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True))
        return answers

    def _stream(self, prompt: str, config: GenerationConfig) -> Iterator[str]:
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

        cancelled = threading.Event()

        class _Cancel(StoppingCriteria):
            def __call__(self, input_ids, scores, **kw):  # noqa: ANN001 - transformers' signature
                return cancelled.is_set()

        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        enc = self._encode([prompt])
        kwargs = self._generate_kwargs(config)
        failure: list[BaseException] = []

        def run() -> None:
            try:
                with torch.inference_mode():
                    self.model.generate(**enc, **kwargs, streamer=streamer,
                                        stopping_criteria=StoppingCriteriaList([_Cancel()]))
            except BaseException as exc:  # re-raised in the consumer's thread below
                failure.append(exc)
                streamer.end()

        thread = threading.Thread(target=run, name="hf-generate-stream", daemon=True)
        thread.start()
        try:
            for piece in streamer:
                if piece:
                    yield piece
        finally:
            cancelled.set()
            thread.join()
        if failure:
            raise failure[0]
