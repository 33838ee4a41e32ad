"""Prompt sets (English, Chinese) for the memory model and the generator, chosen by the text's language.

Each :class:`PromptSet` field is a ``str.format`` template:

* ``context``  - wraps the text to memorize; ``{context}``. Only the part before ``{context}`` goes into the
  memory as its (uncompressed) prefix; the part after it is replayed before every task prompt.
* ``ack``      - the assistant's reply after reading (closes the reading turn).
* ``span``     - recall clue text spans for ``{question}``.
* ``surrogate``- write sharper surrogate questions for ``{question}``.
* ``qa``       - answer ``{question}`` directly from memory (the draft answer).
* ``key_points`` - list the key points of the memorized text (summaries).
* ``qa_gen``   - the generator's evidence-grounded answer: ``{context}`` (evidence), ``{input}`` (question).
* ``sum_gen``  - the generator's summary of ``{context}``.
* ``gist``     - compress one chunk ``{context}`` into a gist (Lite mode).

Upstream-style custom templates use the same placeholders, so ``prompt_template`` strings written for upstream
keep working.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

from memorag_core.errors import InvalidInputError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PromptSet:
    """The templates of one language (see the module docstring for the placeholders)."""

    language: str
    context: str
    ack: str
    span: str
    surrogate: str
    qa: str
    key_points: str
    qa_gen: str
    sum_gen: str
    gist: str

    def replace(self, **changes: str) -> "PromptSet":
        """A copy with some templates overridden (e.g. ``replace(qa_gen="...")``)."""
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise InvalidInputError(f"unknown prompt names {sorted(unknown)}")
        return dataclasses.replace(self, **changes)


EN = PromptSet(
    language="en",
    context=(
        "Below is a long text. Read all of it carefully: afterwards you will be given tasks about its content.\n\n"
        "The text begins here:\n{context}\n\nThe text ends here. Follow the instructions that come next."
    ),
    ack="I have read the whole text. What is the task?",
    span=(
        "A question about the text follows. Recall the passages of the text that help to answer it.\n\n"
        "Question: {question}\n\n"
        "Write one or more short passages from the text that contain the needed details, one per line. "
        "Write only the passages."
    ),
    surrogate=(
        "A question about the text follows. Rewrite it as one or more precise questions that would locate the "
        "evidence for it in the text.\n\n"
        "Question: {question}\n\n"
        "Write only the rewritten questions, one per line."
    ),
    qa=(
        "A question about the text follows. Answer it from what you read.\n\n"
        "Question: {question}\n\n"
        "Give only the answer, with no explanation."
    ),
    key_points=(
        "List the key points of the text: the main ideas, events and facts, one per line, numbered. "
        "Keep each point short and specific."
    ),
    qa_gen="Answer the question using the passages below.\n\n{context}\n\nQuestion: {input}\n\nAnswer briefly.",
    sum_gen="Write a summary of the following text.\n\n{context}",
    gist=(
        "Rewrite the following text as a short plain-prose digest that keeps every key fact, name and number and "
        "drops everything else.\n\nText: {context}\n\nWrite only the digest."
    ),
)

ZH = PromptSet(
    language="zh",
    context="下面是一篇长文本。请认真读完全文：之后你将根据其内容完成任务。\n\n文本开始：\n{context}\n\n文本结束。请按照接下来的指示完成任务。",
    ack="我已读完全文。请给出任务。",
    span="下面是一个关于文本的问题。请回忆文本中有助于回答该问题的段落。\n\n问题：{question}\n\n请逐行写出包含所需细节的简短原文片段，只输出片段。请用中文回答。",
    surrogate="下面是一个关于文本的问题。请把它改写成一个或多个更精确的问题，以便在文本中找到证据。\n\n问题：{question}\n\n只输出改写后的问题，每行一个。请用中文回答。",
    qa="下面是一个关于文本的问题。请根据所读内容回答。\n\n问题：{question}\n\n只给出答案，不要解释。请用中文回答。",
    key_points="请列出文本的要点：主要观点、事件和事实，每行一条并编号，每条简短具体。请用中文回答。",
    qa_gen="请根据下面的段落回答问题。\n\n{context}\n\n问题：{input}\n\n请用中文简要回答。",
    sum_gen="请总结下面的文本，用中文输出。\n\n{context}",
    gist="请把下面的文本改写成简短的纯文本摘要，保留所有关键事实、人名和数字，删去其余内容。\n\n文本：{context}\n\n只输出摘要。",
)

PROMPTS = {"en": EN, "zh": ZH}


def detect_language(text: str, sample_chars: int = 2000) -> str:
    """Return ``"zh"`` when CJK ideographs make up at least 20% of the letters in a sample of ``text``, else ``"en"``.

    A character count, not a model: cheap, deterministic, and good enough to pick between the two prompt sets.
    """
    sample = text[:sample_chars]
    letters = [c for c in sample if c.isalpha()]
    if not letters:
        return "en"
    cjk = sum(1 for c in letters if "\u4e00" <= c <= "\u9fff" or "\u3400" <= c <= "\u4dbf")
    return "zh" if cjk / len(letters) >= 0.2 else "en"


def get_prompts(language: str = "en", text: str | None = None) -> PromptSet:
    """The prompt set for ``language`` (``"en"``, ``"zh"`` or ``"auto"``, which detects it from ``text``)."""
    if language == "auto":
        language = detect_language(text or "")
        logger.info("prompt language detected: %s", language)
    try:
        return PROMPTS[language]
    except KeyError:
        raise InvalidInputError(f"no prompts for language {language!r}; choose one of {sorted(PROMPTS)} or 'auto'")
