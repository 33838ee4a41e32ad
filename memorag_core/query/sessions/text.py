"""The texts of conversation memories: the prompts the memory model answers over them, what one turn (or one
flush of turns into a user memory) adds to a memory, and the clean-up of what the model writes back."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from memorag_core.query.sessions.state import Turn

#: the instruction that turns a follow-up into a standalone question (``{question}`` is the follow-up). Short and
#: direct: small memory models (SmolLM2-135M) echo long instructions back instead of following them.
STANDALONE_PROMPT = (
    "Follow-up question: {question}\n\n"
    "Rewrite the follow-up question as one complete question that uses the name from the conversation instead "
    "of he, she, it, they or that. Write only the complete question."
)
#: the instruction that recalls what the follow-up refers to in the conversation
RECALL_PROMPT = (
    "Follow-up question: {question}\n\n"
    "Who or what in the conversation does the follow-up question refer to? Write only the names, one per line."
)
#: the instruction that recalls what a user's past sessions revealed (preferences, background, questions)
USER_PROMPT = (
    "New request from the same user: {question}\n\n"
    "What did this user say earlier about their preferences, background or interests that bears on the new "
    "request? Write only those facts, one per line."
)


def turn_text(n: int, question: str, answer: str, titles: list[str], max_answer_chars: int) -> str:
    """The text one session turn adds to the memory."""
    answer = " ".join(answer.split())
    if len(answer) > max_answer_chars:
        answer = answer[:max_answer_chars].rsplit(" ", 1)[0] + " ..."
    lines = [f"Turn {n}. The user asked: {' '.join(question.split())}", f"The assistant answered: {answer or '-'}"]
    if titles:
        lines.append("Sources cited: " + "; ".join(dict.fromkeys(titles)))
    return "\n".join(lines) + "\n\n"


def user_text(collection: str, turns: list[Turn]) -> str:
    """The text one flush of session turns adds to a user memory: what the user asked and read."""
    asked = " | ".join(" ".join(t.question.split()) for t in turns)
    titles = list(dict.fromkeys(x for t in turns for x in t.titles))
    line = f"In a conversation about {collection}, the user asked or said: {asked}"
    if titles:
        line += "\nThey read about: " + "; ".join(titles)
    return line + "\n\n"


_BULLET = re.compile(r"^\s*(?:[-*\u2022]|\d+[.)]|[A-Za-z][.)](?=\s))\s*")
_LABEL = re.compile(r"^(?:complete|standalone|rewritten)? ?question\s*:\s*|^names?\s*:\s*", re.IGNORECASE)


def _lines(text: str, limit: int = 6, echo_of: str = "") -> list[str]:
    """Generated text -> distinct non-empty lines (bullets, numbering and "Question:" labels stripped), at most
    ``limit``. A line that only echoes the prompt (``echo_of``: instruction, acknowledgement, context prompt; small
    models repeat them, sometimes paraphrased) is dropped: a piece of it, or 80% of its words from it.

    Short lines are kept: a recalled name ("Shirley Temple") is the most useful recall there is.
    """
    from memorag_core.retrieval.fusion import normalize_query

    echo = normalize_query(echo_of)
    echo_words = set(echo.split())
    out: list[str] = []
    for line in text.splitlines():
        line = _LABEL.sub("", _BULLET.sub("", line).strip()).strip().strip('"').strip()
        key = normalize_query(line)
        words = key.split()
        # an echo: the line is a piece of the prompt, or (paraphrased) at least 80% of its words come from it
        echoed = bool(echo and key) and (key in echo or sum(w in echo_words for w in words) >= 0.8 * len(words))
        if not re.search(r"\w\w", line) or line in out or echoed:
            continue
        out.append(line)
    return out[:limit]


#: the public name of the generated-text clean-up
clean_lines = _lines
