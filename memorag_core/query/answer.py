"""The answer step: the generator reads the evidence and answers (or summarizes), whole or streamed.

:class:`Answerer` builds the generator prompt from the language's prompt set (``qa_gen`` for questions, ``sum_gen``
for summaries; the language is detected from the question and evidence unless given) and runs any
:class:`memorag_core.generators.Generator` (transformers, vLLM, an OpenAI-compatible URL). The Serve app's
generator deployment owns one; so does the in-process engine.
"""

from __future__ import annotations

from collections.abc import Iterator

from memorag_core.errors import InvalidInputError


def generation_prompt(task: str, query: str | None, evidence: list[str], language: str = "auto",
                      template: str | None = None) -> str:
    """The generator prompt: ``qa_gen`` (question + evidence) or, for ``summarize``, ``sum_gen`` (evidence only).

    The language's prompt set is detected from the question and the evidence (``language="auto"``) at every door,
    or given. ``template`` replaces the prompt set's (placeholders ``{context}`` and, for questions, ``{input}``).

    Raises:
        InvalidInputError: no question for a question task, or a template with another placeholder.
    """
    from memorag_core.prompts import get_prompts

    knowledge = "\n\n".join(e.strip() for e in evidence)
    if task != "summarize" and not query:
        raise InvalidInputError("a question is needed to write an answer")
    if template is None:
        prompts = get_prompts(language, f"{query or ''}\n{knowledge}")
        template = prompts.sum_gen if task == "summarize" else prompts.qa_gen
    try:
        return template.format(context=knowledge) if task == "summarize" else template.format(input=query,
                                                                                              context=knowledge)
    except (KeyError, IndexError) as exc:
        raise InvalidInputError(f"prompt template has an unknown placeholder {exc}; use {{context}} and "
                                "{input}") from None


class Answerer:
    """Runs a generator on evidence.

    Args:
        generator: a ready :class:`~memorag_core.generators.Generator`, or a spec for
            :func:`memorag_core.generators.load_generator` (``hf:...``, ``vllm:...``, ``openai:model@url``, None =
            the embedded model through transformers).
    """

    def __init__(self, generator=None) -> None:
        from memorag_core.generators import Generator, load_generator

        self.generator = generator if isinstance(generator, Generator) else load_generator(generator)

    @property
    def name(self) -> str:
        return str(getattr(self.generator, "model_name", None) or type(self.generator).__name__)

    def generate(self, task: str, query: str | None, evidence: list[str], *, max_new_tokens: int = 256,
                 language: str = "auto", template: str | None = None) -> str:
        """The whole answer."""
        prompt = generation_prompt(task, query, evidence, language, template)
        return self.generator.generate(prompt, max_new_tokens=max_new_tokens)[0]

    def stream(self, task: str, query: str | None, evidence: list[str], *, max_new_tokens: int = 256,
               language: str = "auto", template: str | None = None) -> Iterator[str]:
        """The answer in pieces, as the generator writes them."""
        prompt = generation_prompt(task, query, evidence, language, template)
        yield from self.generator.stream(prompt, max_new_tokens=max_new_tokens)
