"""OpenAI-compatible chat-completions backend over plain httpx (no openai SDK needed).

One class serves OpenAI, Azure OpenAI, DeepSeek and any OpenAI-compatible server (vLLM's, llama.cpp's, TGI's):

* ``openai`` (also any OpenAI-compatible server): POST ``{base_url}/chat/completions`` (default base_url
  ``https://api.openai.com/v1``), header ``Authorization: Bearer <key>``, key from ``OPENAI_API_KEY``.
* ``deepseek``: the same with default base_url ``https://api.deepseek.com`` and key from ``DEEPSEEK_API_KEY``.
* ``azure``: POST ``{endpoint}/openai/deployments/{model}/chat/completions?api-version={api_version}`` (``model`` is
  the deployment name), header ``api-key: <key>``, key from ``AZURE_OPENAI_API_KEY``.

With no key (a local server), no auth header is sent. Each prompt is one request with one user message; a batch
runs up to ``max_concurrency`` requests at once. Connection errors, timeouts, 429 and 5xx are retried with
exponential backoff (``Retry-After`` honoured, capped); other statuses (400, 401, 404, ...) fail at once. Every
failure raises :class:`~memorag_core.errors.GeneratorEndpointError` naming the endpoint, the status and the
server's message. :meth:`OpenAIGenerator.stream` uses server-sent events (``"stream": true``).

:class:`Agent` keeps upstream MemoRAG's constructor, ``Agent(model, source, api_dict, temperature=0.0)``.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx

from memorag_core.errors import GeneratorEndpointError, InvalidInputError
from memorag_core.generators.base import GenerationConfig, Generator

logger = logging.getLogger(__name__)

SOURCES = ("openai", "azure", "deepseek")
DEFAULT_BASE_URLS = {"openai": "https://api.openai.com/v1", "deepseek": "https://api.deepseek.com"}
API_KEY_ENV = {"openai": "OPENAI_API_KEY", "azure": "AZURE_OPENAI_API_KEY", "deepseek": "DEEPSEEK_API_KEY"}
RETRY_STATUSES = frozenset({408, 409, 429}) | frozenset(range(500, 600))
MAX_BACKOFF_S = 30.0


class OpenAIGenerator(Generator):
    """Chat completions against an OpenAI-compatible HTTP endpoint.

    Args:
        model: the model name (for Azure: the deployment name).
        base_url: the API root (``.../v1``); for Azure the resource endpoint (``https://<name>.openai.azure.com``).
            None takes the source's default (OpenAI's or DeepSeek's; Azure has none and requires it).
        api_key: the key; None reads the source's environment variable, and sends no auth header if unset.
        source: ``"openai"`` (also any OpenAI-compatible server), ``"azure"`` or ``"deepseek"``.
        api_version: Azure's ``api-version`` query value (required for Azure, unused otherwise).
        timeout: seconds per request (connect, read, write, pool).
        max_retries: retries after the first attempt on connection errors, timeouts, 429 and 5xx (>= 0).
        temperature: default sampling temperature (0.0 greedy); a ``generation`` config overrides it.
        generation: default sampling settings.
        max_concurrency: most requests in flight for one ``generate`` batch (>= 1).
        backoff_s: first retry delay in seconds; it doubles on each retry (capped at 30 s).

    Raises:
        InvalidInputError: unknown source, Azure without endpoint or api_version, a bad number.
    """

    def __init__(self, model: str, *, base_url: str | None = None, api_key: str | None = None,
                 source: str = "openai", api_version: str | None = None, timeout: float = 60,
                 max_retries: int = 3, temperature: float = 0.0, generation: GenerationConfig | None = None,
                 max_concurrency: int = 4, backoff_s: float = 0.5) -> None:
        super().__init__(generation if generation is not None else GenerationConfig(temperature=temperature))
        if source not in SOURCES:
            raise InvalidInputError(f"source must be one of {SOURCES}, got {source!r}")
        if not isinstance(model, str) or not model:
            raise InvalidInputError(f"model must be a non-empty str, got {model!r}")
        if isinstance(max_retries, bool) or not isinstance(max_retries, int) or max_retries < 0:
            raise InvalidInputError(f"max_retries must be an int >= 0, got {max_retries!r}")
        if not (isinstance(timeout, (int, float)) and timeout > 0):
            raise InvalidInputError(f"timeout must be > 0 seconds, got {timeout!r}")
        if isinstance(max_concurrency, bool) or not isinstance(max_concurrency, int) or max_concurrency < 1:
            raise InvalidInputError(f"max_concurrency must be an int >= 1, got {max_concurrency!r}")
        self.model = model
        self.source = source
        self.max_retries = max_retries
        self.max_concurrency = max_concurrency
        self.backoff_s = float(backoff_s)
        if base_url is None:
            if source == "azure":
                raise InvalidInputError("source='azure' needs base_url (the resource endpoint)")
            base_url = DEFAULT_BASE_URLS[source]
        base_url = base_url.rstrip("/")
        if not base_url.startswith(("http://", "https://")):
            raise InvalidInputError(f"base_url must start with http:// or https://, got {base_url!r}")
        if api_key is None:
            api_key = os.environ.get(API_KEY_ENV[source])
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        params: dict[str, str] = {}
        if source == "azure":
            if not api_version:
                raise InvalidInputError("source='azure' needs api_version (e.g. '2024-10-21')")
            self.url = f"{base_url}/openai/deployments/{model}/chat/completions"
            params["api-version"] = api_version
            if api_key:
                headers["api-key"] = api_key
        else:
            self.url = f"{base_url}/chat/completions"
            if api_key:
                headers["Authorization"] = f"Bearer {api_key}"
        self._client = httpx.Client(headers=headers, params=params, timeout=httpx.Timeout(timeout))

    @property
    def endpoint(self) -> str:
        """The full URL requests go to (with Azure's api-version query)."""
        return str(self._client.build_request("POST", self.url).url)

    # -- request plumbing ---------------------------------------------------------------------------------------
    def request_body(self, prompt: str, config: GenerationConfig, stream: bool = False) -> dict[str, Any]:
        """The JSON body for one prompt: one user message plus the sampling settings that are set."""
        body: dict[str, Any] = {
            "model": self.model,
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": config.max_new_tokens,
            "temperature": float(config.temperature),
        }
        if config.top_p is not None:
            body["top_p"] = float(config.top_p)
        if config.repetition_penalty is not None:
            body["repetition_penalty"] = float(config.repetition_penalty)  # vLLM-style servers only
        if config.stop:
            body["stop"] = list(config.stop)
        if stream:
            body["stream"] = True
        return body

    def _delay(self, attempt: int, response: httpx.Response | None) -> float:
        delay = self.backoff_s * (2 ** attempt)
        if response is not None:
            retry_after = response.headers.get("Retry-After")
            try:
                delay = max(delay, float(retry_after)) if retry_after is not None else delay
            except ValueError:
                pass  # an HTTP date: keep the computed backoff
        return min(delay, MAX_BACKOFF_S)

    def _fail(self, response: httpx.Response, attempts: int) -> GeneratorEndpointError:
        try:
            detail = response.json()
            detail = detail.get("error", detail) if isinstance(detail, dict) else detail
            if isinstance(detail, dict):
                detail = detail.get("message", detail)
        except ValueError:
            detail = response.text
        return GeneratorEndpointError(
            f"{self.endpoint} answered HTTP {response.status_code} after {attempts} attempt(s): {str(detail)[:500]}",
            endpoint=self.endpoint, status=response.status_code, attempts=attempts,
        )

    def _send(self, body: dict[str, Any], stream: bool) -> httpx.Response:
        """POST with retries; returns a 2xx response (open, when streaming: the caller closes it)."""
        attempt = 0
        while True:
            attempt += 1
            response: httpx.Response | None = None
            try:
                request = self._client.build_request("POST", self.url, json=body)
                response = self._client.send(request, stream=stream)
            except httpx.TransportError as exc:  # connect/read/write errors and timeouts
                if attempt > self.max_retries:
                    raise GeneratorEndpointError(
                        f"cannot reach {self.endpoint} after {attempt} attempt(s): {type(exc).__name__}: {exc}",
                        endpoint=self.endpoint, status=None, attempts=attempt,
                    ) from exc
                delay = self._delay(attempt - 1, None)
                logger.warning("%s: %s (attempt %d), retrying in %.1fs", self.endpoint, type(exc).__name__,
                               attempt, delay)
                time.sleep(delay)
                continue
            if response.is_success:
                return response
            if stream:
                response.read()
                response.close()
            if response.status_code in RETRY_STATUSES and attempt <= self.max_retries:
                delay = self._delay(attempt - 1, response)
                logger.warning("%s: HTTP %d (attempt %d), retrying in %.1fs", self.endpoint,
                               response.status_code, attempt, delay)
                time.sleep(delay)
                continue
            raise self._fail(response, attempt)

    def _complete(self, prompt: str, config: GenerationConfig) -> str:
        response = self._send(self.request_body(prompt, config), stream=False)
        try:
            data = response.json()
            content = data["choices"][0]["message"].get("content")
        except (ValueError, KeyError, IndexError, TypeError, AttributeError) as exc:
            raise GeneratorEndpointError(
                f"{self.endpoint} answered HTTP {response.status_code} without choices[0].message: "
                f"{response.text[:300]!r}",
                endpoint=self.endpoint, status=response.status_code,
            ) from exc
        return content or ""  # content is null when a filter stopped the answer

    # -- backend hooks ------------------------------------------------------------------------------------------
    def _generate(self, prompts: list[str], config: GenerationConfig) -> list[str]:
        if len(prompts) == 1 or self.max_concurrency == 1:
            return [self._complete(p, config) for p in prompts]
        with ThreadPoolExecutor(max_workers=min(self.max_concurrency, len(prompts))) as pool:
            return list(pool.map(lambda p: self._complete(p, config), prompts))

    def _stream(self, prompt: str, config: GenerationConfig) -> Iterator[str]:
        response = self._send(self.request_body(prompt, config, stream=True), stream=True)
        finished = False  # [DONE] or a finish_reason seen: a stream without either was cut short
        try:
            for line in response.iter_lines():
                if not line.startswith("data:"):
                    continue  # blank separators, comments, event names
                payload = line[len("data:"):].strip()
                if payload == "[DONE]":
                    return
                try:
                    event = json.loads(payload)
                except ValueError as exc:
                    raise GeneratorEndpointError(
                        f"{self.endpoint} sent a malformed stream event: {payload[:200]!r}",
                        endpoint=self.endpoint, status=response.status_code,
                    ) from exc
                if "error" in event:
                    raise GeneratorEndpointError(f"{self.endpoint} sent an error mid-stream: {event['error']}",
                                                 endpoint=self.endpoint, status=response.status_code)
                for choice in event.get("choices") or []:
                    piece = (choice.get("delta") or {}).get("content")
                    if piece:
                        yield piece
                    finished = finished or bool(choice.get("finish_reason"))
            if not finished:
                raise GeneratorEndpointError(
                    f"{self.endpoint} ended the stream before the answer was finished (no [DONE], no finish_reason)",
                    endpoint=self.endpoint, status=response.status_code,
                )
        except httpx.TransportError as exc:  # the connection dropped mid-answer: not retried (text was sent)
            raise GeneratorEndpointError(
                f"{self.endpoint} stream broke off: {type(exc).__name__}: {exc}",
                endpoint=self.endpoint, status=response.status_code,
            ) from exc
        finally:
            response.close()

    def close(self) -> None:
        """Close the HTTP connection pool."""
        self._client.close()


class Agent(OpenAIGenerator):
    """Upstream MemoRAG's API agent: ``Agent(model, source, api_dict, temperature=0.0)``.

    ``api_dict`` keys: ``api_key`` (all sources); ``endpoint`` and ``api_version`` (azure); ``base_url``
    (deepseek, and any OpenAI-compatible server with source ``"openai"``). ``generate(prompt, max_new_tokens)``
    returns a list of strings, as upstream's does.

    Raises:
        InvalidInputError: unknown source, api_dict not a dict, or a key the source needs is missing (named).
    """

    def __init__(self, model: str, source: str, api_dict: dict[str, Any], temperature: float = 0.0) -> None:
        if source not in SOURCES:
            raise InvalidInputError(f"Agent source must be one of {SOURCES}, got {source!r}")
        if not isinstance(api_dict, dict):
            raise InvalidInputError(f"Agent api_dict must be a dict, got {type(api_dict).__name__}")
        required = {"openai": [], "deepseek": [], "azure": ["endpoint", "api_version"]}[source]
        # A local OpenAI-compatible server (source "openai" with a base_url) usually needs no key.
        keyless = source == "openai" and "base_url" in api_dict
        missing = [k for k in ([] if keyless else ["api_key"]) + required if k not in api_dict]
        if missing:
            raise InvalidInputError(f"Agent(source={source!r}) api_dict is missing {missing}")
        base_url = api_dict.get("endpoint") if source == "azure" else api_dict.get("base_url")
        super().__init__(model, base_url=base_url, api_key=api_dict.get("api_key"), source=source,
                         api_version=api_dict.get("api_version"), temperature=temperature)
