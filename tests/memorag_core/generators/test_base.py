"""The generator interface: config validation and overrides, stop-string handling, load_generator's spec forms and
the wrapper of upstream's customized_gen_model (any object with generate(prompt, max_new_tokens) -> list[str])."""

from __future__ import annotations

import pytest

from memorag_core.errors import InvalidInputError
from memorag_core.generators import (
    CustomizedGenerator,
    GenerationConfig,
    Generator,
    HFGenerator,
    load_generator,
    stream_until_stop,
    truncate_at_stop,
)


def test_config_defaults_and_validation():
    cfg = GenerationConfig()
    assert (cfg.max_new_tokens, cfg.temperature, cfg.top_p, cfg.stop) == (256, 0.0, None, None) and cfg.greedy
    for bad in [dict(max_new_tokens=0), dict(max_new_tokens=2.5), dict(temperature=-1), dict(top_p=0),
                dict(top_p=1.5), dict(repetition_penalty=0), dict(stop=[""]), dict(stop=[3])]:
        name = next(iter(bad))
        with pytest.raises(InvalidInputError, match=name):
            GenerationConfig(**bad)
    assert GenerationConfig(stop="###").stop == ["###"]


def test_merged_overrides_and_unknown_names():
    cfg = GenerationConfig(max_new_tokens=10)
    assert cfg.merged() is cfg
    new = cfg.merged(5, temperature=0.7, stop=["x"])
    assert (new.max_new_tokens, new.temperature, new.stop, cfg.max_new_tokens) == (5, 0.7, ["x"], 10)
    with pytest.raises(InvalidInputError, match="do_sample"):
        cfg.merged(do_sample=True)


@pytest.mark.parametrize("text,stop,expected", [
    ("abc###def", ["###"], "abc"),
    ("abc###def<end>", ["<end>", "###"], "abc"),
    ("abcdef", ["###"], "abcdef"),
    ("###", ["###"], ""),
    ("abc", None, "abc"),
])
def test_truncate_at_stop(text, stop, expected):
    assert truncate_at_stop(text, stop) == expected


@pytest.mark.parametrize("pieces", [["ab", "c#", "##d", "ef"], ["a", "b", "c", "#", "#", "#", "d"], ["abc###def"],
                                    ["abc", "##", "x###"], ["no stop ", "here"]])
def test_stream_until_stop_equals_truncate_of_join(pieces):
    stop = ["###"]
    streamed = list(stream_until_stop(iter(pieces), stop))
    assert "".join(streamed) == truncate_at_stop("".join(pieces), stop)
    assert all(streamed)


def test_stream_until_stop_closes_source_early():
    consumed = []

    def source():
        for p in ["a", "###", "never", "reached"]:
            consumed.append(p)
            yield p

    assert "".join(stream_until_stop(source(), ["###"])) == "a"
    assert consumed == ["a", "###"]


class UpstreamStyleModel:
    """An object following upstream's customized_gen_model contract (what users pass in)."""

    def __init__(self):
        self.calls = []

    def generate(self, prompt, max_new_tokens=None):
        self.calls.append((prompt, max_new_tokens))
        return [f"{prompt.upper()} ({max_new_tokens}) END tail"]


def test_customized_model_is_wrapped_per_prompt():
    model = UpstreamStyleModel()
    gen = load_generator(model)
    assert isinstance(gen, CustomizedGenerator)
    assert gen.generate(["a", "b"], max_new_tokens=9) == ["A (9) END tail", "B (9) END tail"]
    assert model.calls == [("a", 9), ("b", 9)]
    assert gen.generate("c", stop=[" END"]) == ["C (256)"]
    assert "".join(gen.stream("d", max_new_tokens=3)) == "D (3) END tail"


def test_customized_model_bad_return_and_missing_method():
    class ReturnsInt:
        def generate(self, prompt, max_new_tokens=None):
            return 42

    with pytest.raises(InvalidInputError, match="ReturnsInt.generate must return"):
        load_generator(ReturnsInt()).generate("x")
    with pytest.raises(InvalidInputError, match="int"):
        load_generator(3)
    with pytest.raises(InvalidInputError, match="object has none"):
        CustomizedGenerator(object())


def test_generate_input_validation():
    gen = load_generator(UpstreamStyleModel())
    assert gen.generate([]) == []
    with pytest.raises(InvalidInputError, match="prompt 1 must be a str"):
        gen.generate(["ok", None])
    with pytest.raises(InvalidInputError, match="dict"):
        gen.generate({"q": 1})
    with pytest.raises(InvalidInputError, match="stream takes one prompt"):
        gen.stream(["a", "b"])
    with pytest.raises(InvalidInputError, match="max_new_tokens"):
        gen.generate("x", max_new_tokens=-1)


def test_load_generator_specs(tiny_lm_dir):
    ready = load_generator(UpstreamStyleModel())
    assert load_generator(ready) is ready
    with pytest.raises(InvalidInputError, match="empty"):
        load_generator("  ")
    with pytest.raises(InvalidInputError, match="unknown generator scheme 'ollama'"):
        load_generator("ollama:llama3")
    with pytest.raises(InvalidInputError, match="names no model"):
        load_generator("openai:@http://127.0.0.1:1")
    for spec in (f"hf:{tiny_lm_dir}", str(tiny_lm_dir)):
        gen = load_generator(spec, batch_size=2)
        assert isinstance(gen, HFGenerator) and gen.batch_size == 2
        assert isinstance(gen, Generator)
