"""OpenAIGenerator and Agent against vLLM's own OpenAI-compatible server, a real subprocess on 127.0.0.1.

One server per module (tiny random Qwen2, fp32, eager, single-process worker) to bound start-up cost; it is
started as ``python -m vllm.entrypoints.openai.api_server`` and polled on /health for at most
SERVER_START_TIMEOUT_S; its log is shown if it dies or never becomes healthy.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import httpx
import pytest

from memorag_core.errors import GeneratorEndpointError
from memorag_core.generators import Agent, HFGenerator, OpenAIGenerator, load_generator
from tests.memorag_core.generators.conftest import free_port

pytest.importorskip("vllm", reason="the optional vLLM engine is not installed")

SERVER_START_TIMEOUT_S = 480  # ~40-60 s on an idle 2-core machine; 270 s seen at load average 18
SERVED_NAME = "tiny-qwen"
PROMPTS = ["What is the capital of France?", "Tell me a long story about dragons and knights, please."]


@pytest.fixture(scope="module")
def vllm_server(tiny_qwen_dir, tmp_path_factory):
    """Base URL (``http://127.0.0.1:<port>/v1``) of a running vLLM OpenAI-compatible server."""
    port = free_port()
    log_path = tmp_path_factory.mktemp("vllm-server") / "server.log"
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(tiny_qwen_dir),
           "--served-model-name", SERVED_NAME, "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
           "--enforce-eager", "--distributed-executor-backend", "uni", "--gpu-memory-utilization", "0.3",
           "--max-model-len", "2048"]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"vLLM server exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"vLLM server not healthy after {SERVER_START_TIMEOUT_S}s:\n"
                            f"{log_path.read_text()[-3000:]}")
            time.sleep(1)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_chat_completions_match_transformers_greedy(vllm_server, tiny_qwen_dir):
    gen = OpenAIGenerator(SERVED_NAME, base_url=vllm_server, timeout=60)
    answers = gen.generate(PROMPTS, max_new_tokens=10)
    assert len(answers) == 2 and all(a.strip() for a in answers)
    assert gen.generate(PROMPTS, max_new_tokens=10) == answers  # greedy is deterministic
    # the server templates the user message with the same tokenizer: same greedy tokens as transformers
    hf = HFGenerator(str(tiny_qwen_dir))
    tok = hf.tokenizer
    for served, local in zip(answers, hf.generate(PROMPTS, max_new_tokens=10)):
        assert tok.encode(served, add_special_tokens=False) == tok.encode(local, add_special_tokens=False)


def test_agent_and_spec_against_server(vllm_server):
    agent = Agent(SERVED_NAME, "openai", {"base_url": vllm_server, "api_key": "unused"})
    out = agent.generate(PROMPTS[0], max_new_tokens=6)
    assert isinstance(out, list) and len(out) == 1 and out[0].strip()
    assert load_generator(f"openai:{SERVED_NAME}@{vllm_server}").generate(PROMPTS[0], max_new_tokens=6) == out


def test_stream_joins_to_full_answer(vllm_server):
    gen = OpenAIGenerator(SERVED_NAME, base_url=vllm_server)
    pieces = list(gen.stream(PROMPTS[1], max_new_tokens=12))
    assert len(pieces) > 1
    assert "".join(pieces) == gen.generate(PROMPTS[1], max_new_tokens=12)[0]


def test_unknown_model_is_a_clear_error_without_retry(vllm_server):
    gen = OpenAIGenerator("no-such-model", base_url=vllm_server, max_retries=3, backoff_s=0.5)
    start = time.monotonic()
    with pytest.raises(GeneratorEndpointError, match="no-such-model") as info:
        gen.generate("hello")
    assert info.value.status == 404 and info.value.attempts == 1
    assert vllm_server + "/chat/completions" in str(info.value)
    assert time.monotonic() - start < 5  # no backoff sleeps happened


def test_wrong_port_fails_after_bounded_retries(vllm_server):
    port = int(vllm_server.rsplit(":", 1)[1].split("/")[0])
    wrong = free_port()
    assert wrong != port
    gen = OpenAIGenerator(SERVED_NAME, base_url=f"http://127.0.0.1:{wrong}/v1", max_retries=2, backoff_s=0.05)
    with pytest.raises(GeneratorEndpointError, match=f"cannot reach http://127.0.0.1:{wrong}/v1") as info:
        gen.generate("hello")
    assert info.value.attempts == 3 and info.value.status is None
