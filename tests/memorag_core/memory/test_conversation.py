"""The memorized conversation follows the chat template the way MemoRAG's memory checkpoints were trained: the
context is one user turn closed by the assistant's acknowledgement, and each clue request is a new user turn."""

from __future__ import annotations

from memorag_core.memory import MemoryConfig, build_memory


def test_context_turn_then_ack_then_a_new_user_turn_per_task(tiny_lm_dir):
    m = build_memory(MemoryConfig(model=str(tiny_lm_dir), ratio=2, window=128))
    m.memorize("Harry lives at number four, Privet Drive.")
    head, middle, tail = m._render(m.prompts)
    task = m.prompts.span.format(question="Where does Harry live?")
    full = head + "TEXT" + middle + task + tail
    user, assistant = "<|im_start|>user\n", "<|im_start|>assistant\n"
    # user turn holding the context, the assistant's acknowledgement, a new user turn with the task, then the answer
    assert full.index(user) < full.index("TEXT") < full.index(assistant) < full.index(m.prompts.ack)
    assert full.index(m.prompts.ack) < full.rindex(user) < full.index(task) < full.rindex(assistant)
    assert full.count(user) == 2 and full.count(assistant) == 2
    assert full.endswith(assistant)
    # the memory holds the head and the text; the rest is replayed per request, so append() continues the text
    assert m.task_ids(task) == m._encode(middle + task + tail)
    # clue length: 128 new tokens by default where clues are written (facade, evaluation)
    from memorag_core.eval.runner import EvalConfig
    from memorag_core.facade import MemoRAG

    assert EvalConfig(dataset="x.jsonl").clue_max_new_tokens == 128
    assert MemoRAG.__init__.__kwdefaults__["clue_max_new_tokens"] == 128
