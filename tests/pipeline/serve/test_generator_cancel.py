"""The Generator deployment's class on its own (no Ray), with the tiny random Llama through transformers (random
weights rarely stop by themselves, so a long answer is still being decoded when its caller goes away): a caller
that goes away stops the decoding, streamed or not."""

from __future__ import annotations

import asyncio
import time

import pytest

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def generator(tiny_lm_dir, tmp_path_factory):
    from pipeline.serve.config import ServeAppConfig
    from pipeline.serve.deployments import Generator

    cfg = ServeAppConfig.model_validate({"store": str(tmp_path_factory.mktemp("store")), "generator": {
        "spec": f"hf:{tiny_lm_dir}", "device": "cpu", "warm": False}})
    return Generator.func_or_class(cfg)


async def _wait_idle(gen, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while gen.stats()["active"] and time.monotonic() < deadline:
        await asyncio.sleep(0.05)


def test_a_stream_whose_caller_goes_away_stops_decoding(generator):
    async def run():
        before = generator.stats()
        stream = generator.stream("qa", "Tell me everything.", ["Some evidence."], 2000)
        first = await stream.__anext__()
        t0 = time.monotonic()
        await stream.aclose()  # what Serve does when the client disconnects
        await _wait_idle(generator)
        return before, first, generator.stats(), time.monotonic() - t0

    before, first, after, took = asyncio.run(run())
    assert first and after["active"] == 0 and took < 20
    assert after["cancelled"] == before["cancelled"] + 1 and after["stopped"] == before["stopped"] + 1


def test_a_whole_answer_decoded_alone_stops_when_its_caller_goes_away(generator):
    """What :meth:`Generator.generate` does when Serve cancels it: the job's event is set, and the lone decode
    (``_generate_one``, run by the Serve batch in a worker thread) stops at the next piece. (``serve.batch`` itself
    needs a replica, so the batch is exercised over HTTP in test_serve_app.)"""
    import threading

    from memorag_core.query import generation_prompt

    cancelled = threading.Event()
    before = generator.stats()
    threading.Timer(1.0, cancelled.set).start()
    t0 = time.monotonic()
    text = generator._generate_one(generation_prompt("qa", "Tell me everything.", ["Some evidence."]), 2000,
                                   cancelled)
    took = time.monotonic() - t0
    assert generator.stats()["stopped"] == before["stopped"] + 1 and took < 20 and isinstance(text, str)
    done = threading.Event()
    assert generator._generate_one(generation_prompt("qa", "Hi?", ["Evidence."]), 3, done) is not None
    assert generator.stats()["stopped"] == before["stopped"] + 1  # an answer nobody cancelled runs to its end
