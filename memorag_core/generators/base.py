"""The generator interface: one prompt in, one answer out, whatever the backend.

Every backend (Hugging Face transformers, vLLM's engine, an OpenAI-compatible HTTP endpoint, the memory model
itself, or a user's own object) sits behind :class:`Generator`. A prompt is always ONE user message; the backend
applies its own chat template (or the server does). ``generate`` returns one string per prompt, in order;
``stream`` yields text pieces of one answer.

Sampling settings live in a :class:`GenerationConfig`; a generator holds a default one, and each call may override
fields by keyword (``generate(p, temperature=0.7)``). ``temperature=0.0`` means greedy decoding everywhere.
Stop strings are applied in this module too (:func:`truncate_at_stop`, :func:`stream_until_stop`), so that every
backend cuts its text the same way: the answer ends just before the first stop string, which is not included.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from memorag_core.errors import InvalidInputError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class GenerationConfig:
    """Sampling settings shared by every backend.

    Attributes:
        max_new_tokens: most tokens to generate per prompt (> 0).
        temperature: sampling temperature (>= 0); 0.0 is greedy decoding.
        top_p: nucleus sampling mass in (0, 1]; None leaves the backend's default (1.0, no nucleus cut).
        repetition_penalty: > 0, 1.0 is none; None leaves it off. OpenAI proper does not accept it; vLLM's
            OpenAI-compatible server does.
        stop: strings that end an answer; the answer is cut just before the first one. None or [] for none.
    """

    max_new_tokens: int = field(default=256, metadata={"description": "most tokens to generate per prompt (> 0)"})
    temperature: float = field(default=0.0, metadata={"description": "sampling temperature (>= 0); 0.0 is greedy"})
    top_p: float | None = field(
        default=None, metadata={"description": "nucleus sampling mass in (0, 1]; None for the backend default"}
    )
    repetition_penalty: float | None = field(
        default=None, metadata={"description": "repetition penalty (> 0, 1.0 is none); None leaves it off"}
    )
    stop: list[str] | None = field(
        default=None, metadata={"description": "strings that end an answer (cut before the first one)"}
    )

    def __post_init__(self) -> None:
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) \
                or self.max_new_tokens <= 0:
            raise InvalidInputError(f"max_new_tokens must be a positive int, got {self.max_new_tokens!r}")
        if not isinstance(self.temperature, (int, float)) or self.temperature < 0:
            raise InvalidInputError(f"temperature must be a number >= 0, got {self.temperature!r}")
        if self.top_p is not None and not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            raise InvalidInputError(f"top_p must be in (0, 1] or None, got {self.top_p!r}")
        if self.repetition_penalty is not None and not (
            isinstance(self.repetition_penalty, (int, float)) and self.repetition_penalty > 0
        ):
            raise InvalidInputError(f"repetition_penalty must be > 0 or None, got {self.repetition_penalty!r}")
        if self.stop is not None:
            if isinstance(self.stop, str):
                # A bare string is a common slip; accept it as one stop string rather than its characters.
                object.__setattr__(self, "stop", [self.stop])
            if not all(isinstance(s, str) and s for s in self.stop):
                raise InvalidInputError(f"stop must be a list of non-empty strings, got {self.stop!r}")
            object.__setattr__(self, "stop", list(self.stop))

    @property
    def greedy(self) -> bool:
        """True when decoding is greedy (temperature 0)."""
        return self.temperature == 0

    def merged(self, max_new_tokens: int | None = None, **overrides: Any) -> "GenerationConfig":
        """A copy with ``max_new_tokens`` (when not None) and the named fields replaced.

        Raises:
            InvalidInputError: an override names no field of GenerationConfig, or a value is out of range.
        """
        names = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise InvalidInputError(
                f"unknown generation setting(s) {unknown}; known: {sorted(names)}"
            )
        if max_new_tokens is not None:
            overrides["max_new_tokens"] = max_new_tokens
        return dataclasses.replace(self, **overrides) if overrides else self


def truncate_at_stop(text: str, stop: list[str] | None) -> str:
    """Cut ``text`` just before the earliest occurrence of any stop string (unchanged when none occurs)."""
    if not stop:
        return text
    cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=-1)
    return text if cut < 0 else text[:cut]


def stream_until_stop(pieces: Iterable[str], stop: list[str] | None) -> Iterator[str]:
    """Re-yield streamed ``pieces``, ending just before the first stop string.

    Text that could be the start of a stop string is held back until it is known not to be one, so a stop string
    split across pieces is still caught. The joined output equals ``truncate_at_stop("".join(pieces), stop)``.
    The source iterator is closed when a stop string is found (a backend can then stop generating).
    """
    if not stop:
        yield from pieces
        return
    longest = max(len(s) for s in stop)
    pending = ""
    iterator = iter(pieces)
    try:
        for piece in iterator:
            pending += piece
            cut = truncate_at_stop(pending, stop)
            if len(cut) < len(pending):
                if cut:
                    yield cut
                return
            # Keep the last (longest - 1) characters: they may begin a stop string that the next piece completes.
            safe = len(pending) - (longest - 1)
            if safe > 0:
                yield pending[:safe]
                pending = pending[safe:]
        if pending:
            yield pending
    finally:
        close = getattr(iterator, "close", None)
        if close is not None:
            close()


def chat_prompt(tokenizer: Any, prompt: str) -> str:
    """The text a model sees for one user message: its chat template with a generation prompt, or the raw prompt
    when the tokenizer has no template (a base model)."""
    if not getattr(tokenizer, "chat_template", None):
        return prompt
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)


def normalize_prompts(prompts: str | list[str]) -> list[str]:
    """``str`` -> ``[str]``; a list/tuple of str unchanged; anything else raises InvalidInputError naming it."""
    if isinstance(prompts, str):
        return [prompts]
    if not isinstance(prompts, (list, tuple)):
        raise InvalidInputError(f"prompts must be a str or a list of str, got {type(prompts).__name__}")
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise InvalidInputError(f"prompt {i} must be a str, got {type(p).__name__}")
    return list(prompts)


class Generator(ABC):
    """A text generator: each prompt is one user message; the backend applies its chat template.

    Subclasses implement :meth:`_generate` (a batch, with a resolved config) and may implement :meth:`_stream`
    (real token streaming); the public methods validate input and merge per-call overrides.

    Args:
        generation: the default sampling settings of this generator (GenerationConfig() when None).
    """

    def __init__(self, generation: GenerationConfig | None = None) -> None:
        self.generation = generation if generation is not None else GenerationConfig()

    def generate(self, prompts: str | list[str], max_new_tokens: int | None = None, **overrides: Any) -> list[str]:
        """Answer each prompt; returns one string per prompt, in order (``[]`` for an empty list).

        Args:
            prompts: one prompt or a list; each is ONE user message.
            max_new_tokens: overrides the default config's limit for this call.
            overrides: other GenerationConfig fields for this call (``temperature``, ``top_p``, ``stop``, ...).

        Raises:
            InvalidInputError: a prompt is not a str, or an override is unknown or out of range.
        """
        batch = normalize_prompts(prompts)
        config = self.generation.merged(max_new_tokens, **overrides)
        if not batch:
            return []
        outputs = self._generate(batch, config)
        if len(outputs) != len(batch):  # a backend bug, not a user error
            raise RuntimeError(f"{type(self).__name__} returned {len(outputs)} answers for {len(batch)} prompts")
        # a token budget can end inside a multi-byte character (Chinese text): every backend drops the partial one
        return [truncate_at_stop(o.rstrip("\ufffd"), config.stop) for o in outputs]

    def stream(self, prompt: str, max_new_tokens: int | None = None, **overrides: Any) -> Iterator[str]:
        """Yield the answer to one prompt in text pieces; joined, they equal ``generate(prompt)[0]``.

        Backends without token streaming yield the whole answer once.
        """
        if not isinstance(prompt, str):
            raise InvalidInputError(f"stream takes one prompt (a str), got {type(prompt).__name__}")
        config = self.generation.merged(max_new_tokens, **overrides)
        return stream_until_stop(self._stream(prompt, config), config.stop)

    @abstractmethod
    def _generate(self, prompts: list[str], config: GenerationConfig) -> list[str]:
        """Backend hook: answer a non-empty batch with a resolved config (stop strings may be left in)."""

    def _stream(self, prompt: str, config: GenerationConfig) -> Iterator[str]:
        """Backend hook for streaming; the default yields the whole answer once."""
        yield self._generate([prompt], config)[0]

    def close(self) -> None:
        """Release engines, threads and connections; the default does nothing."""

    def __enter__(self) -> "Generator":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class CustomizedGenerator(Generator):
    """Wraps upstream's ``customized_gen_model``: any object with ``generate(prompt, max_new_tokens=None)``.

    Upstream's contract returns a list of strings for one prompt; the first element is the answer (a plain str
    is accepted too). The object is called once per prompt. Settings other than ``max_new_tokens`` cannot be
    passed through the upstream contract; they are ignored with a warning (once), except ``stop``, which is
    applied to the returned text.

    Raises:
        InvalidInputError: the object has no callable ``generate``, or it returns something other than a str or
            a non-empty list of str (the message names the type).
    """

    def __init__(self, model: Any, generation: GenerationConfig | None = None) -> None:
        if not callable(getattr(model, "generate", None)):
            raise InvalidInputError(
                f"a customized generation model needs a generate(prompt, max_new_tokens) method; "
                f"{type(model).__name__} has none"
            )
        super().__init__(generation)
        self.model = model
        self._warned = False
        try:
            params = inspect.signature(model.generate).parameters
            self._takes_max_new_tokens = "max_new_tokens" in params or any(
                p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()
            )
        except (TypeError, ValueError):
            self._takes_max_new_tokens = True

    def _generate(self, prompts: list[str], config: GenerationConfig) -> list[str]:
        ignored = {k for k in ("temperature", "top_p", "repetition_penalty")
                   if getattr(config, k) != getattr(GenerationConfig(), k)}
        if ignored and not self._warned:
            logger.warning("%s.generate takes only max_new_tokens; ignoring %s",
                           type(self.model).__name__, sorted(ignored))
            self._warned = True
        answers = []
        for prompt in prompts:
            if self._takes_max_new_tokens:
                out = self.model.generate(prompt, max_new_tokens=config.max_new_tokens)
            else:
                out = self.model.generate(prompt)
            answers.append(self._first_text(out))
        return answers

    def _first_text(self, out: Any) -> str:
        if isinstance(out, str):
            return out
        if isinstance(out, (list, tuple)) and out and isinstance(out[0], str):
            return out[0]
        raise InvalidInputError(
            f"{type(self.model).__name__}.generate must return a str or a non-empty list of str, "
            f"got {type(out).__name__}: {out!r:.100}"
        )
