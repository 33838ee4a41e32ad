"""Model families as memory models: tiny random models built from each family's config.

For every supported family: (a) a ratio-1 memory followed by a question gives the same logits and greedy tokens
as the whole text in the prompt; (b) re-rotating stored keys by ``delta`` positions equals computing them at the
new position (every layer: RoPE attention is shift-invariant, so deeper keys move by a pure rotation too).
Unsupported models are refused at construction with a message naming what is missing.
"""

from __future__ import annotations

import functools

import pytest
import torch

from memorag_core.errors import UnsupportedModelError
from memorag_core.memory import MemoryConfig, build_memory, scoring

TEXT = ("Mr. and Mrs. Dursley, of number four, Privet Drive, were proud to say that they were perfectly normal, "
        "thank you very much. They were the last people you would expect to be involved in anything strange or "
        "mysterious, because they just did not hold with such nonsense. Mr. Dursley was the director of a firm "
        "called Grunnings, which made drills. He was a big, beefy man with hardly any neck.")

_COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, head_dim=16, max_position_embeddings=4096, tie_word_embeddings=True)


def _family(name: str):
    """(config class, extra config fields) of each family tested; names say what each one exercises."""
    import transformers as tf

    return {
        "llama": (tf.LlamaConfig, {}),
        "llama-yarn": (tf.LlamaConfig, {"rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0,
                                                            "factor": 4.0, "original_max_position_embeddings": 1024}}),
        "llama-dynamic": (tf.LlamaConfig, {"rope_parameters": {"rope_type": "dynamic", "rope_theta": 10000.0,
                                                               "factor": 2.0}, "max_position_embeddings": 2048}),
        "qwen2": (tf.Qwen2Config, {}),
        "qwen3": (tf.Qwen3Config, {}),  # q/k norms before the rotation
        "mistral": (tf.MistralConfig, {"sliding_window": None}),  # v0.2+ (no sliding window)
        "phi3-partial": (tf.Phi3Config, {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0,
                                                             "partial_rotary_factor": 0.5}}),
        "gemma3": (tf.Gemma3TextConfig, {"sliding_window": 1024, "query_pre_attn_scalar": 16,
                                         "layer_types": ["sliding_attention", "full_attention"]}),  # per-layer rope
        "cohere-interleaved": (tf.CohereConfig, {}),
        "glm-interleaved-partial": (tf.GlmConfig, {}),  # partial_rotary_factor 0.5 by default
        # layers without rotary (4 layers so that each has one): SmolLM3 skips it on every 4th layer
        # (no_rope_layers [1, 1, 1, 0]); Cohere2 (interleaved) and EXAONE-4 rotate only their sliding layers
        # (layer_types: 3 sliding, then 1 full)
        "smollm3-nope": (tf.SmolLM3Config, {"num_hidden_layers": 4}),
        "cohere2-interleaved-nope": (tf.Cohere2Config, {"num_hidden_layers": 4}),
        "exaone4-nope": (tf.Exaone4Config, {"num_hidden_layers": 4}),
        # refused when keys must move: partial rotary applied by the attention to a channel slice
        "phi-slice": (tf.PhiConfig, {"partial_rotary_factor": 0.5}),
        "persimmon-slice": (tf.PersimmonConfig, {}),
        # refused: multi-head latent attention
        "deepseek3-mla": (tf.DeepseekV3Config, {"kv_lora_rank": 16, "q_lora_rank": None, "qk_rope_head_dim": 8,
                                                "head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 16,
                                                "num_key_value_heads": 4, "n_routed_experts": 4,
                                                "num_experts_per_tok": 2, "first_k_dense_replace": 2,
                                                "n_group": 1, "topk_group": 1, "moe_intermediate_size": 32}),
    }[name]


FAMILIES = ["llama", "llama-yarn", "llama-dynamic", "qwen2", "qwen3", "mistral", "phi3-partial", "gemma3",
            "cohere-interleaved", "glm-interleaved-partial", "smollm3-nope", "cohere2-interleaved-nope",
            "exaone4-nope"]
# the layers each family leaves unrotated (transformers 5.19 modeling code), checked against the probe
NO_ROPE_LAYERS = {"smollm3-nope": [3], "cohere2-interleaved-nope": [3], "exaone4-nope": [3]}


@functools.cache
def _tokenizer():
    from memorag_core.models import embedded_lm_path, load_tokenizer

    return load_tokenizer(str(embedded_lm_path()))


def tiny(name: str, **overrides):
    """A random-weight 2-layer model of family ``name`` (fp32, weights at std 0.2 so greedy choices are clear);
    built once per family when there are no overrides."""
    return _tiny_cached(name) if not overrides else _build(name, **overrides)


@functools.cache
def _tiny_cached(name: str):
    return _build(name)


def _build(name: str, **overrides):
    from transformers import AutoModelForCausalLM

    tok = _tokenizer()
    cls, extra = _family(name)
    fields = {**_COMMON, **extra, **overrides, "vocab_size": len(tok), "bos_token_id": tok.bos_token_id,
              "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cls(**fields), dtype=torch.float32).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.2)
    return model, tok


@pytest.mark.parametrize("name", FAMILIES)
def test_ratio_one_memory_equals_the_whole_text_in_the_prompt(name):
    model, tok = tiny(name)
    mem = build_memory(MemoryConfig(kind="full_kv", ratio=1, window=48), model, tok)
    mem.memorize(TEXT)
    prompt = mem.task_ids(mem.prompts.qa.format(question="Where do the Dursleys live?"))
    whole = mem.head_ids() + mem._encode(TEXT) + prompt
    assert mem.entries + len(prompt) == len(whole)

    from memorag_core.memory.pointers import crop_to

    n = len(prompt)
    with torch.no_grad():
        after = model(input_ids=torch.tensor([prompt]), past_key_values=mem.cache, use_cache=True,
                      position_ids=torch.arange(mem.next_position, mem.next_position + n)[None]).logits[0]
        crop_to(mem.cache, mem.entries)
        model.set_attn_implementation("sdpa")
        try:
            ref = model(input_ids=torch.tensor([whole])).logits[0, -n:]
            want = model.generate(input_ids=torch.tensor([whole]), attention_mask=torch.ones(1, len(whole),
                                  dtype=torch.long), max_new_tokens=8, min_new_tokens=8, do_sample=False,
                                  pad_token_id=tok.pad_token_id)[0, len(whole):].tolist()
        finally:
            model.set_attn_implementation(scoring.register())
    torch.testing.assert_close(after, ref, rtol=1e-4, atol=1e-4)
    got = mem._generate([prompt], 8)[0]
    assert got == want[:len(got)] and (len(got) == 8 or want[len(got)] in {tok.eos_token_id})


@pytest.mark.parametrize("name", FAMILIES)
def test_rerotation_equals_computing_at_the_new_position(name):
    from transformers import DynamicCache

    model, tok = tiny(name)
    mem = build_memory(MemoryConfig(ratio=4, window=64), model, tok)
    ids = torch.tensor([tok(TEXT[:120], add_special_tokens=False)["input_ids"]])
    n = ids.shape[1]

    def keys_at(start):
        cache = DynamicCache()
        with torch.no_grad():
            model(input_ids=ids, position_ids=torch.arange(start, start + n)[None], past_key_values=cache,
                  use_cache=True)
        return [layer.keys for layer in cache.layers]  # each (1, kv_heads, n, d)

    at_300, at_37 = keys_at(300), keys_at(37)
    for layer_idx, (k300, k37) in enumerate(zip(at_300, at_37)):
        delta = torch.full((1, k300.shape[1], n), -263)
        torch.testing.assert_close(mem._rerotate(k300, delta, layer_idx), k37, rtol=1e-4, atol=2e-4)
    rotation = mem.support.rotation
    expected_layout = "interleaved" if "interleaved" in name else "half"
    assert rotation.layout == expected_layout
    assert rotation.rotary_dim == (8 if "partial" in name else 16)
    layers = model.config.num_hidden_layers
    assert [i for i in range(layers) if not rotation.rotary_layers[i]] == NO_ROPE_LAYERS.get(name, [])


def test_compressed_memory_runs_on_every_family():
    for name in FAMILIES:
        model, tok = tiny(name)
        mem = build_memory(MemoryConfig(ratio=4, window=32), model, tok)
        mem.memorize(TEXT)
        assert mem.entries < len(mem._encode(TEXT)) and isinstance(mem.answer("Who?", 3), str)


def test_unsupported_models_are_refused_at_construction_naming_the_cause():
    model, tok = tiny("gemma3", sliding_window=64)
    with pytest.raises(UnsupportedModelError, match="sliding-window attention \\(64 tokens"):
        build_memory(MemoryConfig(ratio=4, window=128), model, tok)
    model, tok = tiny("gemma3", attn_logit_softcapping=50.0)
    with pytest.raises(UnsupportedModelError, match="softcapping"):
        build_memory(MemoryConfig(ratio=4, window=64), model, tok)
    model, tok = _build("llama")
    model.model.layers[0].self_attn.sinks = torch.nn.Parameter(torch.zeros(4))  # as gpt-oss attention has
    with pytest.raises(UnsupportedModelError, match="sinks"):
        build_memory(MemoryConfig(ratio=4, window=64), model, tok)
    model, tok = _build("llama")
    del model.model.rotary_emb
    with pytest.raises(UnsupportedModelError, match="no rotary embedding"):
        build_memory(MemoryConfig(ratio=4, window=64), model, tok)
    # keys that never move need no rotary embedding
    build_memory(MemoryConfig(ratio=4, window=64, positions="original"), model, tok)


@pytest.mark.parametrize("name,cls", [("phi-slice", "PhiForCausalLM"), ("persimmon-slice", "PersimmonForCausalLM")])
def test_partial_rotary_on_a_channel_slice_is_refused_when_keys_move_and_exact_when_they_stay(name, cls):
    model, tok = tiny(name)
    with pytest.raises(UnsupportedModelError, match=f"{cls}: partial rotary \\(8 of 16 channels\\).*Phi and Persimmon"):
        build_memory(MemoryConfig(ratio=4, window=32), model, tok)
    mem = build_memory(MemoryConfig(ratio=4, window=32, positions="original"), model, tok)
    mem.memorize(TEXT)
    assert mem.next_position == len(mem.head_ids()) + len(mem._encode(TEXT)) and mem.answer("Who?", 3) is not None


def test_multi_head_latent_attention_is_refused_by_name():
    model, tok = tiny("deepseek3-mla")
    for positions in ("compact", "original"):
        with pytest.raises(UnsupportedModelError, match="DeepseekV3ForCausalLM: multi-head latent attention "
                                                        "\\(kv_lora_rank=16"):
            build_memory(MemoryConfig(ratio=4, window=32, positions=positions), model, tok)


def test_the_length_dependent_rope_limit_holds_for_original_positions_and_for_decoding():
    model, tok = tiny("llama-dynamic", max_position_embeddings=192)
    mem = build_memory(MemoryConfig(ratio=4, window=32, positions="original"), model, tok)
    with pytest.raises(UnsupportedModelError, match="reading the text would reach position .* past "
                                                    "original_max_position_embeddings=192.*positions='original'"):
        mem.memorize(TEXT + " " + TEXT)  # 54 + 184 tokens at their own positions
    mem = build_memory(MemoryConfig(ratio=4, window=32), model, tok)
    mem.memorize(TEXT + " " + TEXT)  # compact: about a quarter of the tokens' positions
    assert mem.next_position == 54 + 184 // 4  # the prompt head, then a quarter of the text
    assert isinstance(mem.answer("Who?", max_new_tokens=4), str)
    with pytest.raises(UnsupportedModelError, match="decoding the question would reach position"):
        mem.answer("Who?", max_new_tokens=128)


def test_a_memory_outgrowing_a_sliding_window_is_refused_before_it_is_wrong():
    model, tok = tiny("gemma3", sliding_window=96)
    mem = build_memory(MemoryConfig(ratio=1, kind="full_kv", window=32), model, tok)
    with pytest.raises(UnsupportedModelError, match="beyond the sliding window of 96"):
        mem.memorize(TEXT)
