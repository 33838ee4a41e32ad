"""The ``Memory`` base class: one interface over every memory kind.

A memory reads text once (``memorize``, ``append``) and keeps a compact state of it; afterwards the model, attending
to that state, writes clues: ``recall`` (text spans), ``rewrite`` (surrogate questions), ``answer`` (a draft answer)
and ``summarize`` (key points). Subclasses decide what the state is and how text enters it (``_ingest``), how to
generate after it (``_generate``) and how it is exported to tensors (``export``/``import_tensors``). Everything
else (input checks, prompts, language, stats, save/load through the artifact store) lives here, once.

The conversation the model sees, in its chat template::

    [system?] user: <context prompt head> TEXT...(memory)   <context prompt tail>
              assistant: <ack>
              user: <task prompt with the question>
              assistant: -> generated

Only the head and the text are memorized (so ``append`` simply continues the text); the tail, the
acknowledgement and the task are the per-query prompt, replayed after the memory.
"""

from __future__ import annotations

import logging
import time
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, ClassVar

from memorag_core.errors import InvalidInputError, MemoryNotReadyError
from memorag_core.memory.config import MemoryConfig, MemoryStats, stable_hash
from memorag_core.prompts import PromptSet, get_prompts

if TYPE_CHECKING:
    from memorag_core.store.memory_file import MemoryFileInfo, MemoryTensors

logger = logging.getLogger(__name__)

_TEXT_MARK = "\u2063MEMORAG_TEXT\u2063"
_TASK_MARK = "\u2063MEMORAG_TASK\u2063"


def check_text(text: Any, what: str = "text") -> str:
    """Return ``text`` as ``str``; bytes must be UTF-8. Raises InvalidInputError naming the problem."""
    if isinstance(text, (bytes, bytearray)):
        try:
            text = bytes(text).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InvalidInputError(f"{what} is not valid UTF-8 (byte {exc.start}: {exc.reason})") from None
    if not isinstance(text, str):
        raise InvalidInputError(f"{what} must be str or UTF-8 bytes, got {type(text).__name__}")
    if "\x00" in text:
        raise InvalidInputError(f"{what} contains NUL bytes: binary data, not text")
    if not text.strip():
        raise InvalidInputError(f"{what} is empty")
    return text


class Memory(ABC):
    """Base class of all memory kinds. Construct through :func:`memorag_core.memory.build_memory`.

    Attributes:
        config: the validated :class:`MemoryConfig`.
        model, tokenizer: the memory model (a Hugging Face causal LM) and its tokenizer.
        prompts: the :class:`PromptSet` in use (chosen from the first memorized text unless configured).
        stats: :class:`MemoryStats` of what has been memorized.
    """

    kind: ClassVar[str]
    #: show a progress bar while reading long texts (the CLI turns it on)
    show_progress: bool = False

    def __init__(self, config: MemoryConfig, model: Any = None, tokenizer: Any = None) -> None:
        self.config = config
        if model is None:
            model, tokenizer = self._load_model()
        elif tokenizer is None:
            raise InvalidInputError("a memory given a model must also be given its tokenizer")
        self.model = model
        self.tokenizer = tokenizer
        self.prompts: PromptSet | None = None
        self.stats = MemoryStats()
        self.reset()

    # -- construction -------------------------------------------------------------------------------------------
    def _load_model(self) -> tuple[Any, Any]:
        from memorag_core.models import load_causal_lm

        return load_causal_lm(self.config.model, self.config.load)

    @property
    def model_id(self) -> str:
        """Name of the memory model as configured (``None`` -> the embedded id)."""
        from memorag_core.models import EMBEDDED_LM

        return self.config.model or EMBEDDED_LM

    @property
    def model_revision(self) -> str:
        """The checkpoint's commit hash when it came from the hub, else a hash of its config (never empty)."""
        rev = getattr(self.model.config, "_commit_hash", None)
        return rev or stable_hash(self.model.config.to_diff_dict())[:16]

    def fingerprint(self) -> str:
        """Hash of (model id, model revision, memory kind and config): part of content-addressed unit ids."""
        return stable_hash({"model": self.model_id, "revision": self.model_revision,
                            "config": self.config.fingerprint_dict()})[:32]

    # -- state --------------------------------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget everything memorized."""
        self.stats = MemoryStats()
        self.prompts = None
        self._reset_state()

    @property
    def is_empty(self) -> bool:
        return self.stats.raw_tokens == 0

    @abstractmethod
    def _reset_state(self) -> None: ...

    @abstractmethod
    def _ingest(self, token_ids: list[int], *, is_prefix: bool) -> None:
        """Read ``token_ids`` into the memory; the prefix (prompt head) is kept uncompressed."""

    @abstractmethod
    def _generate(self, prompts: list[list[int]], max_new_tokens: int, **sampling: Any) -> list[list[int]]:
        """Generate after the memory for each prompt (token ids); return the new token ids of each."""

    @abstractmethod
    def _state_nbytes(self) -> int: ...

    @abstractmethod
    def _state_entries(self) -> int: ...

    # -- prompts ------------------------------------------------------------------------------------------------
    def _render(self, prompts: PromptSet) -> tuple[str, str, str]:
        """Split the chat-templated conversation into (memory head, text-to-task middle, task-to-answer tail)."""
        messages = [
            {"role": "user", "content": prompts.context.format(context=_TEXT_MARK)},
            {"role": "assistant", "content": prompts.ack},
            {"role": "user", "content": _TASK_MARK},
        ]
        if getattr(self.tokenizer, "chat_template", None):
            rendered = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        else:  # a base model without a chat template: a plain transcript
            rendered = "".join(f"{m['role'].capitalize()}: {m['content']}\n\n" for m in messages) + "Assistant:"
        head, rest = rendered.split(_TEXT_MARK)
        middle, tail = rest.split(_TASK_MARK)
        return head, middle, tail

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def head_ids(self) -> list[int]:
        """Token ids of the memory's prefix (chat header and the context prompt's head)."""
        assert self.prompts is not None
        return self._encode(self._render(self.prompts)[0])

    def task_frame(self) -> tuple[str, str]:
        """The text replayed after the memory before a task prompt (end of the context turn, the acknowledgement,
        the new user turn's opening) and after it (end of that turn, the assistant's header): ``task_ids(task)``
        encodes ``before + task + after``. Raises MemoryNotReadyError when nothing is memorized."""
        if self.prompts is None:
            raise MemoryNotReadyError("nothing is memorized: call memorize(text) or load(url) first")
        _, middle, tail = self._render(self.prompts)
        return middle, tail

    def task_ids(self, task: str) -> list[int]:
        """Token ids replayed after the memory for one task prompt (already formatted)."""
        if self.prompts is None:
            raise MemoryNotReadyError("nothing is memorized: call memorize(text) or load(url) first")
        _, middle, tail = self._render(self.prompts)
        return self._encode(middle + task + tail)

    # -- reading ------------------------------------------------------------------------------------------------
    def memorize(self, text: str | bytes) -> MemoryStats:
        """Forget what was memorized, then read ``text``. Returns the stats. Raises InvalidInputError on bad text."""
        text = check_text(text)
        self.reset()
        return self.append(text)

    def memorize_many(self, texts: list[str | bytes]) -> list["MemoryTensors"]:
        """Memorize each text as a memory of its own; return their exported tensors (headers with stats), in order.

        Here one text after another; kinds that can, read several texts per model forward (see
        :meth:`CompressedKVMemory.memorize_many`). Afterwards this memory holds the last text.
        """
        out = []
        for text in texts:
            self.memorize(text)
            out.append(self.export())
        return out

    def append(self, text: str | bytes) -> MemoryStats:
        """Read more text after what is memorized, without re-reading it (conversations, new documents).

        The text is tokenized on its own and continues the memorized token stream; to make ``append(a);
        append(b)`` read exactly like ``memorize(a + b)``, split texts at whitespace boundaries.
        """
        text = check_text(text)
        start = time.perf_counter()
        if self.is_empty:
            self._reset_state()
            self.prompts = get_prompts(self.config.language, text)
            self._ingest(self.head_ids(), is_prefix=True)
        ids = self._encode(text)
        self._ingest(ids, is_prefix=False)
        self.stats.raw_tokens += len(ids)
        self.stats.entries = self._state_entries()
        self.stats.nbytes = self._state_nbytes()
        self.stats.seconds += time.perf_counter() - start
        logger.info("memorized %d tokens -> %d entries (%.2fx) in %.1fs", self.stats.raw_tokens,
                    self.stats.entries, self.stats.compression, self.stats.seconds)
        return self.stats

    # -- writing clues ------------------------------------------------------------------------------------------
    def generate(self, instructions: str | list[str], query: str = "", max_new_tokens: int = 256,
                 **sampling: Any) -> list[str]:
        """Generate after the memory for each instruction (``{question}`` is filled with ``query``).

        Several instructions are decoded together as one batch. ``sampling`` takes ``temperature``, ``top_p``,
        ``repetition_penalty`` (default greedy).
        """
        if self.is_empty or self.prompts is None:
            raise MemoryNotReadyError("nothing is memorized: call memorize(text) or load(url) first")
        if isinstance(instructions, str):
            instructions = [instructions]
        if query:
            query = self.check_query(query)
        tasks = [inst.format(question=query) if query else inst for inst in instructions]
        outs = self._generate([self.task_ids(t) for t in tasks], max_new_tokens, **sampling)
        # a token budget can end inside a multi-byte character (Chinese text): drop the partial character
        return [self.tokenizer.decode(o, skip_special_tokens=True).rstrip("\ufffd").strip() for o in outs]

    def check_query(self, query: str) -> str:
        """``query`` if it is text within ``config.max_query_tokens`` tokens; InvalidInputError naming the bound
        otherwise."""
        query = check_text(query, "query")
        n = len(self._encode(query))
        if n > self.config.max_query_tokens:
            raise InvalidInputError(
                f"query is {n} tokens long; the limit is max_query_tokens={self.config.max_query_tokens}")
        return query

    def recall(self, query: str, max_new_tokens: int = 128) -> str:
        """Text spans from the memorized text that help answer ``query`` (one per line)."""
        return self.generate(self._p().span, query, max_new_tokens)[0]

    def rewrite(self, query: str, max_new_tokens: int = 128) -> str:
        """Sharper surrogate questions for ``query`` (one per line)."""
        return self.generate(self._p().surrogate, query, max_new_tokens)[0]

    def answer(self, query: str, max_new_tokens: int = 128) -> str:
        """A draft answer to ``query`` from memory alone."""
        return self.generate(self._p().qa, query, max_new_tokens)[0]

    def summarize(self, max_new_tokens: int = 512) -> str:
        """Key points of the memorized text, one per line."""
        return self.generate(self._p().key_points, "", max_new_tokens)[0]

    def clue_texts(self, query: str, max_new_tokens: int = 128, with_answer: bool = False) -> dict[str, str]:
        """Spans, surrogate questions (and optionally a draft answer) for ``query``, decoded as one batch."""
        return self.clue_texts_many([query], max_new_tokens, with_answer=with_answer)[0]

    def clue_texts_many(self, queries: list[str], max_new_tokens: int = 128, with_answer: bool = False
                        ) -> list[dict[str, str]]:
        """:meth:`clue_texts` for several queries, all their prompts decoded together as one batch after the
        memory (concurrent requests to one memory cost one pass over it per step)."""
        p = self._p()
        names = ["spans", "surrogates"] + (["answer"] if with_answer else [])
        insts = [p.span, p.surrogate] + ([p.qa] if with_answer else [])
        # instructions are filled here; query "" below leaves them as they are
        tasks = [inst.format(question=self.check_query(q)) for q in queries for inst in insts]
        outs = self.generate(tasks, "", max_new_tokens)
        n = len(insts)
        return [dict(zip(names, outs[j * n:(j + 1) * n])) for j in range(len(queries))]

    def _p(self) -> PromptSet:
        if self.prompts is None:
            raise MemoryNotReadyError("nothing is memorized: call memorize(text) or load(url) first")
        return self.prompts

    # -- persistence --------------------------------------------------------------------------------------------
    def header(self) -> dict:
        """The JSON header stored with the memory tensors."""
        return {
            "kind": self.kind,
            "model": self.model_id,
            "model_revision": self.model_revision,
            "fingerprint": self.fingerprint(),
            "config": self.config.to_dict(),
            "language": self.prompts.language if self.prompts else None,
            # content only (no wall time), so that the same text gives byte-identical memory files
            "stats": {"raw_tokens": self.stats.raw_tokens, "entries": self.stats.entries,
                      "nbytes": self.stats.nbytes},
        }

    def _restore_header(self, header: dict) -> None:
        """Check a stored header against this memory and restore prompts and stats from it."""
        from memorag_core.errors import CorruptArtifactError
        from memorag_core.prompts import PROMPTS

        if header.get("kind") != self.kind:
            raise CorruptArtifactError(f"memory file holds a {header.get('kind')!r} memory, not {self.kind!r}")
        if header.get("fingerprint") != self.fingerprint():
            raise CorruptArtifactError(
                f"memory file was made by model {header.get('model')!r} (revision {header.get('model_revision')}) "
                f"with config {header.get('config')}, which differs from this memory's "
                f"({self.model_id!r}, revision {self.model_revision}); load it with the same model and config")
        self.prompts = PROMPTS[header["language"]]
        s = header["stats"]
        self.stats = MemoryStats(raw_tokens=s["raw_tokens"], entries=s["entries"], nbytes=s["nbytes"])

    @abstractmethod
    def export(self) -> "MemoryTensors":
        """The memory as tensors plus a JSON header (see memorag_core.store.memory_file)."""

    @abstractmethod
    def import_tensors(self, m: "MemoryTensors") -> None:
        """Replace the state with exported tensors; raises CorruptArtifactError if they do not fit this model."""

    def save(self, url: str, storage_dtype: str | None = None,
             storage_options: dict | None = None) -> "MemoryFileInfo":
        """Write the memory as safetensors (local path or s3:// URL); atomic. Returns size and sha256."""
        from memorag_core.store.memory_file import save_memory

        if self.is_empty:
            raise MemoryNotReadyError("nothing is memorized: there is no memory to save")
        return save_memory(self.export(), url, storage_dtype=storage_dtype, storage_options=storage_options)

    def load(self, url: str, expected_sha256: str | None = None, storage_options: dict | None = None) -> None:
        """Read a memory written by :meth:`save`; verifies the checksum when given, and the model fingerprint."""
        from memorag_core.store.memory_file import load_memory

        m = load_memory(url, expected_sha256=expected_sha256, dtype=self.model.dtype,
                        device=str(self.model.device), storage_options=storage_options)
        self.import_tensors(m)

    def drop_entries(self, tensors: "MemoryTensors", start: int, count: int, raw_tokens: int = 0
                     ) -> "MemoryTensors":
        """Exported ``tensors`` of this memory with entries ``[start, start + count)`` cut out, nothing re-read.

        Every layer's K and V ``(kv_heads, entries, d)`` (and attention offsets ``(kv_heads, entries)``) lose the
        range. A memory that re-rotates keys (compact positions) rotates the keys after the range back by
        ``count`` positions, so that positions stay compact and inside the model's range; the header's counts
        follow (``raw_tokens``: how many source tokens the cut entries had read). Conversation memories fold
        their oldest turns away with it (:mod:`memorag_core.query.sessions`).

        Raises:
            CorruptArtifactError: a layer holds fewer than ``start + count`` entries.
        """
        import torch

        from memorag_core.errors import CorruptArtifactError
        from memorag_core.store.memory_file import MemoryTensors

        if count <= 0:
            return tensors
        rerotate = getattr(self, "_rerotate", None)
        end = start + count
        keys, values = [], []
        for i, (k, v) in enumerate(zip(tensors.keys, tensors.values)):  # each (kv_heads, entries, d)
            if k.shape[1] < end:
                raise CorruptArtifactError(f"memory layer {i} holds {k.shape[1]} entries, fewer than the {end} "
                                           "to cut")
            rest = k[:, end:]  # (kv_heads, entries - end, d)
            if rerotate is not None and rest.shape[1]:
                delta = torch.full((1, rest.shape[0], rest.shape[1]), -count, dtype=torch.long,
                                   device=rest.device)  # (1, kv_heads, entries - end)
                rest = rerotate(rest[None], delta, layer_idx=i)[0]
            keys.append(torch.cat([k[:, :start], rest], dim=1))  # (kv_heads, entries - count, d)
            values.append(torch.cat([v[:, :start], v[:, end:]], dim=1))  # (kv_heads, entries - count, d)
        extra = {}
        for name, t in tensors.extra.items():
            if name.startswith("offsets.") and t.dim() == 2 and t.shape[1] >= end:
                t = torch.cat([t[:, :start], t[:, end:]], dim=1)  # (kv_heads, entries - count)
            extra[name] = t
        header = dict(tensors.header)
        header["entries"] = int(header["entries"]) - count
        if "next_position" in header and rerotate is not None:
            header["next_position"] = int(header["next_position"]) - count
        header["raw_tokens"] = max(0, int(header.get("raw_tokens", 0)) - raw_tokens)
        stats = dict(header.get("stats") or {})
        stats["entries"] = header["entries"]
        stats["raw_tokens"] = max(0, int(stats.get("raw_tokens", 0)) - raw_tokens)
        stats["nbytes"] = sum(t.numel() * t.element_size() for t in keys + values)
        header["stats"] = stats
        return MemoryTensors(keys=keys, values=values, header=header, extra=extra)
