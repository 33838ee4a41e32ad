"""OpenAIGenerator and Agent against a real recording HTTP server on 127.0.0.1 (stdlib http.server).

Checks the URL, headers and body each source builds, the retry policy (retry on connection errors, 429, 5xx; none
on 400/401/404) and streaming over server-sent events. The real vLLM server is in test_vllm_server.py.
"""

from __future__ import annotations

import time

import pytest

from memorag_core.errors import GeneratorEndpointError, InvalidInputError
from memorag_core.generators import Agent, OpenAIGenerator, load_generator
from tests.memorag_core.generators.conftest import ScriptedResponse, free_port


def test_openai_source_url_headers_and_body(openai_like_server):
    gen = OpenAIGenerator("gpt-test", base_url=openai_like_server.url + "/v1/", api_key="sk-abc",
                          temperature=0.3)
    out = gen.generate(["first question", "second question"], max_new_tokens=7, top_p=0.9, stop=["\n\n"])
    assert out == ["echo: first question", "echo: second question"]
    assert len(openai_like_server.requests) == 2
    req = openai_like_server.requests[0]
    assert req.path == "/v1/chat/completions"
    assert req.headers["authorization"] == "Bearer sk-abc"
    assert "api-key" not in req.headers
    bodies = sorted((r.body for r in openai_like_server.requests), key=lambda b: b["messages"][0]["content"])
    assert bodies[0] == {"model": "gpt-test", "messages": [{"role": "user", "content": "first question"}],
                         "max_tokens": 7, "temperature": 0.3, "top_p": 0.9, "stop": ["\n\n"]}


def test_no_key_sends_no_auth_header(openai_like_server, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    gen = OpenAIGenerator("local", base_url=openai_like_server.url + "/v1")
    assert gen.generate("q") == ["echo: q"]
    assert "authorization" not in openai_like_server.requests[0].headers


def test_key_from_environment(openai_like_server, monkeypatch):
    monkeypatch.setenv("DEEPSEEK_API_KEY", "ds-env")
    gen = OpenAIGenerator("deepseek-chat", base_url=openai_like_server.url, source="deepseek")
    gen.generate("q")
    assert openai_like_server.requests[0].headers["authorization"] == "Bearer ds-env"


def test_azure_agent_maps_endpoint_deployment_version_and_api_key_header(openai_like_server):
    agent = Agent("my-deployment", "azure", {"api_key": "az-key", "endpoint": openai_like_server.url,
                                             "api_version": "2024-10-21"})
    assert agent.generate("hello azure") == ["echo: hello azure"]
    req = openai_like_server.requests[0]
    assert req.path == "/openai/deployments/my-deployment/chat/completions?api-version=2024-10-21"
    assert req.headers["api-key"] == "az-key"
    assert "authorization" not in req.headers
    assert agent.endpoint == (openai_like_server.url
                              + "/openai/deployments/my-deployment/chat/completions?api-version=2024-10-21")


def test_deepseek_agent_uses_base_url_and_bearer(openai_like_server):
    agent = Agent("deepseek-chat", "deepseek", {"api_key": "ds-key", "base_url": openai_like_server.url},
                  temperature=0.5)
    assert agent.generate("hi", max_new_tokens=3) == ["echo: hi"]
    req = openai_like_server.requests[0]
    assert req.path == "/chat/completions"
    assert req.headers["authorization"] == "Bearer ds-key"
    assert req.body["temperature"] == 0.5 and req.body["max_tokens"] == 3


def test_deepseek_and_openai_default_base_urls():
    assert OpenAIGenerator("m", source="deepseek", api_key="k").url == "https://api.deepseek.com/chat/completions"
    assert OpenAIGenerator("m", api_key="k").url == "https://api.openai.com/v1/chat/completions"


def test_openai_agent_accepts_base_url_without_key(openai_like_server):
    agent = Agent("local-model", "openai", {"base_url": openai_like_server.url + "/v1"})
    assert agent.generate("x") == ["echo: x"]


@pytest.mark.parametrize("source,api_dict,missing", [
    ("azure", {"api_key": "k", "endpoint": "http://127.0.0.1:1"}, "api_version"),
    ("azure", {"api_key": "k", "api_version": "v"}, "endpoint"),
    ("deepseek", {"base_url": "http://127.0.0.1:1"}, "api_key"),
    ("openai", {}, "api_key"),
])
def test_agent_names_missing_api_dict_key(source, api_dict, missing):
    with pytest.raises(InvalidInputError, match=missing):
        Agent("m", source, api_dict)


def test_bad_configuration_is_rejected():
    with pytest.raises(InvalidInputError, match="source"):
        OpenAIGenerator("m", source="anthropic")
    with pytest.raises(InvalidInputError, match="api_version"):
        OpenAIGenerator("m", source="azure", base_url="http://127.0.0.1:1")
    with pytest.raises(InvalidInputError, match="base_url"):
        OpenAIGenerator("m", base_url="127.0.0.1:8000/v1")
    with pytest.raises(InvalidInputError, match="max_retries"):
        OpenAIGenerator("m", base_url="http://127.0.0.1:1", max_retries=-1)


def test_retries_5xx_and_429_then_succeeds(openai_like_server):
    openai_like_server.script = [ScriptedResponse(503, {"error": {"message": "overloaded"}}),
                                 ScriptedResponse(429, {"error": {"message": "slow down"}}, {"Retry-After": "0"})]
    gen = OpenAIGenerator("m", base_url=openai_like_server.url, max_retries=3, backoff_s=0.01)
    assert gen.generate("after retries") == ["echo: after retries"]
    assert len(openai_like_server.requests) == 3


def test_gives_up_after_max_retries_naming_endpoint_and_status(openai_like_server):
    openai_like_server.script = [ScriptedResponse(500, {"error": {"message": "boom"}})] * 5
    gen = OpenAIGenerator("m", base_url=openai_like_server.url, max_retries=2, backoff_s=0.01)
    with pytest.raises(GeneratorEndpointError) as info:
        gen.generate("q")
    err = info.value
    assert err.status == 500 and err.attempts == 3
    assert openai_like_server.url + "/chat/completions" in str(err) and "500" in str(err) and "boom" in str(err)
    assert len(openai_like_server.requests) == 3


@pytest.mark.parametrize("status", [400, 401, 404])
def test_no_retry_on_client_errors(openai_like_server, status):
    openai_like_server.script = [ScriptedResponse(status, {"error": {"message": f"client error {status}"}})]
    gen = OpenAIGenerator("m", base_url=openai_like_server.url, max_retries=3, backoff_s=0.01)
    with pytest.raises(GeneratorEndpointError, match=f"HTTP {status}.*client error {status}") as info:
        gen.generate("q")
    assert info.value.status == status and info.value.attempts == 1
    assert len(openai_like_server.requests) == 1


def test_connection_refused_is_retried_then_named():
    port = free_port()
    gen = OpenAIGenerator("m", base_url=f"http://127.0.0.1:{port}/v1", max_retries=2, backoff_s=0.05, timeout=2)
    start = time.monotonic()
    with pytest.raises(GeneratorEndpointError, match=f"cannot reach http://127.0.0.1:{port}/v1/chat/completions "
                                                     "after 3 attempt") as info:
        gen.generate("q")
    assert info.value.status is None and info.value.attempts == 3
    assert 0.15 <= time.monotonic() - start < 5  # two backoffs of 0.05 and 0.1 s, bounded


def test_malformed_answer_is_a_clear_error(openai_like_server):
    openai_like_server.script = [ScriptedResponse(200, {"unexpected": True})]
    gen = OpenAIGenerator("m", base_url=openai_like_server.url)
    with pytest.raises(GeneratorEndpointError, match="without choices"):
        gen.generate("q")


def test_stream_over_sse_joins_to_full_answer(openai_like_server):
    gen = OpenAIGenerator("m", base_url=openai_like_server.url)
    pieces = list(gen.stream("one two three four"))
    assert len(pieces) == 5
    assert "".join(pieces) == "echo: one two three four" == gen.generate("one two three four")[0]
    assert openai_like_server.requests[0].body["stream"] is True


def test_stream_cuts_at_stop_string_split_across_pieces(openai_like_server):
    gen = OpenAIGenerator("m", base_url=openai_like_server.url)
    # the server sends "echo:", " alpha", " beta", " gamma"; the stop string spans two pieces
    assert "".join(gen.stream("alpha beta gamma", stop=["a be"])) == "echo: alph"
    assert gen.generate("alpha beta gamma", stop=["a be"]) == ["echo: alph"]


def test_load_generator_openai_spec(openai_like_server):
    gen = load_generator(f"openai:my-model@{openai_like_server.url}/v1", api_key="k")
    assert isinstance(gen, OpenAIGenerator)
    assert gen.generate("spec") == ["echo: spec"]
    assert openai_like_server.requests[0].body["model"] == "my-model"
    assert openai_like_server.requests[0].path == "/v1/chat/completions"


def test_stream_cut_short_is_an_error(openai_like_server):
    event = '{"choices": [{"index": 0, "delta": {"content": "partial"}}]}'
    openai_like_server.script = [ScriptedResponse(200, f"data: {event}\n\n", {"Content-Type": "text/event-stream"})]
    gen = OpenAIGenerator("m", base_url=openai_like_server.url)
    pieces = []
    with pytest.raises(GeneratorEndpointError, match="before the answer was finished"):
        for piece in gen.stream("q"):
            pieces.append(piece)
    assert pieces == ["partial"]


def test_stream_error_status_is_not_retried_and_named(openai_like_server):
    openai_like_server.script = [ScriptedResponse(401, {"error": {"message": "bad key"}})]
    gen = OpenAIGenerator("m", base_url=openai_like_server.url, max_retries=3)
    with pytest.raises(GeneratorEndpointError, match="HTTP 401.*bad key"):
        list(gen.stream("q"))
    assert len(openai_like_server.requests) == 1
