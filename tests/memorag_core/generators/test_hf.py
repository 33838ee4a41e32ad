"""HFGenerator with a tiny random-weight Llama (real SmolLM2 tokenizer and chat template) and, once, the embedded
SmolLM2-135M-Instruct. Greedy outputs are compared against a manual ``model.generate`` on the templated prompt."""

from __future__ import annotations

import pytest
import torch

from memorag_core.errors import InvalidInputError, ModelNotFoundError
from memorag_core.generators import HFGenerator, load_generator
from memorag_core.models import load_causal_lm

PROMPTS = [
    "What is the capital of France?",
    "hi",
    "Summarize the plot of a long novel about a boy wizard, his friends and a dark lord in three sentences.",
    "List three colours.",
    "Why?",
]


@pytest.fixture(scope="module")
def tiny(tiny_lm_dir):
    """(model, tokenizer) of the tiny Llama, loaded once for the module."""
    return load_causal_lm(str(tiny_lm_dir))


def manual_greedy(model, tokenizer, prompt: str, n: int) -> str:
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def test_greedy_equals_manual_generate(tiny):
    model, tokenizer = tiny
    gen = HFGenerator.from_model(model, tokenizer)
    for prompt in PROMPTS[:3]:
        expected = manual_greedy(model, tokenizer, prompt, 12)
        assert expected.strip(), "the tiny model should produce visible text"
        assert gen.generate(prompt, max_new_tokens=12) == [expected]


def test_batched_equals_one_by_one(tiny):
    model, tokenizer = tiny
    one_by_one = [HFGenerator.from_model(model, tokenizer, batch_size=1).generate(p, max_new_tokens=10)[0]
                  for p in PROMPTS]
    # batch_size 3 over 5 prompts of different lengths: two left-padded batches
    batched = HFGenerator.from_model(model, tokenizer, batch_size=3).generate(PROMPTS, max_new_tokens=10)
    assert batched == one_by_one
    assert len(set(batched)) == len(PROMPTS)


def test_max_new_tokens_bounds_the_answer(tiny):
    model, tokenizer = tiny
    gen = HFGenerator.from_model(model, tokenizer)
    short, longer = gen.generate(PROMPTS[0], max_new_tokens=3)[0], gen.generate(PROMPTS[0], max_new_tokens=9)[0]
    assert 0 < len(tokenizer.encode(short, add_special_tokens=False)) <= 4  # re-tokenizing may merge/split one
    assert longer.startswith(short) and len(longer) > len(short)


def test_stream_pieces_join_to_generate_output(tiny):
    model, tokenizer = tiny
    gen = HFGenerator.from_model(model, tokenizer)
    pieces = list(gen.stream(PROMPTS[2], max_new_tokens=16))
    assert len(pieces) > 1
    assert "".join(pieces) == gen.generate(PROMPTS[2], max_new_tokens=16)[0]


def test_stop_strings_cut_generate_and_stream(tiny):
    model, tokenizer = tiny
    gen = HFGenerator.from_model(model, tokenizer)
    full = gen.generate(PROMPTS[0], max_new_tokens=12)[0]
    stop = full[len(full) // 2: len(full) // 2 + 3]
    expected = full[: full.index(stop)]
    assert gen.generate(PROMPTS[0], max_new_tokens=12, stop=[stop]) == [expected]
    assert "".join(gen.stream(PROMPTS[0], max_new_tokens=12, stop=[stop])) == expected


def test_abandoned_stream_stops_generation_thread(tiny):
    import threading

    model, tokenizer = tiny
    gen = HFGenerator.from_model(model, tokenizer)
    stream = gen.stream(PROMPTS[1], max_new_tokens=200)
    next(stream)
    stream.close()  # runs the generator's finally: cancels and joins the worker thread
    assert not [t for t in threading.enumerate() if t.name == "hf-generate-stream"]


def test_sampling_with_temperature_runs_and_is_seedable(tiny):
    model, tokenizer = tiny
    gen = HFGenerator.from_model(model, tokenizer)
    torch.manual_seed(1)
    a = gen.generate(PROMPTS[0], max_new_tokens=8, temperature=1.0, top_p=0.9)
    torch.manual_seed(1)
    b = gen.generate(PROMPTS[0], max_new_tokens=8, temperature=1.0, top_p=0.9)
    assert a == b and a[0]
    assert gen.generate(PROMPTS[0], max_new_tokens=8, repetition_penalty=1.3)[0]


def test_bad_arguments(tiny, tmp_path):
    model, tokenizer = tiny
    with pytest.raises(InvalidInputError, match="batch_size"):
        HFGenerator.from_model(model, tokenizer, batch_size=0)
    with pytest.raises(InvalidInputError, match="str"):
        HFGenerator.from_model("not a model", tokenizer)
    with pytest.raises(ModelNotFoundError, match="does-not-exist"):
        HFGenerator(str(tmp_path / "does-not-exist"))
    with pytest.raises(ModelNotFoundError, match="does-not-exist"):
        load_generator(f"hf:{tmp_path / 'does-not-exist'}")


def test_embedded_smollm2_answers(embedded_lm_dir):
    # The real default model (SmolLM2-135M-Instruct): a first generate in a process pays a warm-up of several
    # seconds on CPU, so this stays at one short prompt.
    gen = load_generator(None)
    assert gen.generate("What is the capital of France?", max_new_tokens=8) == ["The capital of France is Paris."]
