"""The first minute of ``memorag serve``: a default config fits the node, the URL is printed only once every
deployment runs, and the first question does not pay for loading.

The fast tests check the CPU fitting on configs alone; the slow one starts the application with its defaults on
the 2-CPU test Ray (``jobs.serve.start_serve``, as the CLI does) and answers a question.
"""

from __future__ import annotations

import shutil
import time

import httpx
import pytest

from memorag_core.errors import InvalidInputError
from pipeline.serve.config import ServeAppConfig, cpu_demand, fit_to_cpus


def test_defaults_ask_for_more_than_two_cpus_and_are_scaled_to_fit():
    cfg = ServeAppConfig(store="/tmp/x")
    assert sum(cpu_demand(cfg).values()) == pytest.approx(2.75)  # what made the Generator wait forever
    fitted, note = fit_to_cpus(cfg, 2.0)
    demand = cpu_demand(fitted)
    assert sum(demand.values()) <= 2.0 and min(demand.values()) > 0.1
    assert demand["memory"] == demand["generator"] > demand["retriever"] > demand["ingress"]
    assert "2.75" in note and "2 CPUs" in note
    same, none = fit_to_cpus(cfg, 4.0)
    assert same is cfg and none is None


def test_explicit_sizes_that_do_not_fit_are_refused_naming_the_shortfall_and_setting():
    cfg = ServeAppConfig.model_validate({"store": "/tmp/x", "generator": {"deployment": {"num_cpus": 2.0}}})
    with pytest.raises(InvalidInputError) as err:
        fit_to_cpus(cfg, 2.0)
    assert "3.75 CPUs" in str(err.value) and "1.75 short" in str(err.value)
    assert "generator.deployment.num_cpus" in str(err.value)
    _, note = fit_to_cpus(cfg, 2.0, refuse=False)  # a joined cluster may autoscale: a warning only
    assert "generator.deployment.num_cpus" in note
    # explicit sizes that fit keep their value; the defaults share what is left
    cfg = ServeAppConfig.model_validate({"store": "/tmp/x", "generator": {"deployment": {"num_cpus": 1.0}}})
    fitted, _ = fit_to_cpus(cfg, 2.0)
    assert fitted.generator.deployment.num_cpus == 1.0 and sum(cpu_demand(fitted).values()) <= 2.0


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_memorag_serve_with_defaults_on_a_two_cpu_ray_answers(ray_local, embedded_collection, tmp_path):
    """Defaults (only the store and loopback) on the 2-CPU test cluster: deploys, tells what it waits for, the
    first question is answered without paying for loading the models, and the README's curl form (no JSON
    content type) works. Took ~100-150 s on the shared 2-core machine."""
    from ray import serve

    from jobs.serve import app_config, start_serve
    from memorag_core.store.keys import ApiKeyStore
    from tests.fixtures.ray_cluster import free_port

    store = tmp_path / "store"
    shutil.copytree(embedded_collection.store, store, ignore=shutil.ignore_patterns("leases"))
    _, key = ApiKeyStore(str(store)).create("facts")
    port, said = free_port(), []
    t0 = time.perf_counter()
    url = start_serve(app_config(str(store)), port=port, progress=said.append, wait_s=600)
    started = time.perf_counter() - t0
    try:
        assert any("scaled" in s for s in said), said
        t1 = time.perf_counter()
        r = httpx.post(url + "/v1/collections/facts/query", headers={"Authorization": f"Bearer {key}"},
                       content='{"query": "Who built the lighthouse of Varnholm?", "max_new_tokens": 8}',
                       timeout=300)  # no content type, as curl -d sends it
        first = time.perf_counter() - t1
        assert r.status_code == 200, r.text
        # the default memorag task: no text clues, the memory model's attention re-ranked (warmed at start)
        assert r.json()["clues"] == [] and "rerank" in r.json()["timings"], r.json()["timings"]
        print(f"started in {started:.0f} s, first answer in {first:.1f} s")
    finally:
        serve.shutdown()
