"""Conversations over HTTP and the web page in a real browser, against one real local Serve app for the module
(embedded models, the facts collection the memorize job published, API keys on).

The browser is Debian's headless Chromium driven by Selenium (chromium + chromium-driver, installed by .ci/run);
screenshots go to the test's temp folder, and with ``MEMORAG_DOCS_SCREENSHOT=1`` the conversation one is also
written to docs/web_page.png.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import httpx
import pytest

from memorag_core.store.keys import ApiKeyStore
from tests.fixtures.ray_cluster import free_port

pytestmark = pytest.mark.timeout(900)

SMALL = {"num_cpus": 0.1}
FAST = {"task": "qa", "top_k": 2, "max_new_tokens": 6}


@pytest.fixture(scope="module")
def served(ray_local, embedded_collection, tmp_path_factory):
    from ray import serve

    from pipeline.serve.app import build_app
    from pipeline.serve.config import ServeAppConfig

    store = tmp_path_factory.mktemp("conv-serve") / "store"
    shutil.copytree(embedded_collection.store, store, ignore=shutil.ignore_patterns("leases"))
    keys = ApiKeyStore(str(store))
    _, key = keys.create("facts")
    _, other = keys.create("other")
    cfg = ServeAppConfig.model_validate({
        "store": str(store), "auth": True, "host": "127.0.0.1", "refresh_s": 1.0,
        "limits": {"max_new_tokens": 64, "max_units": 4, "max_top_k": 10, "max_body_bytes": 16384,
                   "max_in_flight": 4, "retry_after_s": 2},
        "ingress": {"deployment": {**SMALL, "max_ongoing_requests": 16}, "key_cache_s": 0.0,
                    "key_index_refresh_s": 0.0},
        "memory": {"device": "cpu", "deployment": {**SMALL, "max_ongoing_requests": 8}},
        "retriever": {"device": "cpu", "deployment": SMALL},
        "generator": {"spec": "hf:", "device": "cpu", "deployment": SMALL},
        "sessions": {"standalone_tokens": 16, "recall_tokens": 16, "max_history_messages": 6},
    })
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(cfg), name="memorag-conv", route_prefix="/")
    try:
        yield {"url": f"http://127.0.0.1:{port}", "key": key, "other": other, "store": str(store)}
    finally:
        serve.shutdown()


def call(served, method, path, body=None, key="own", timeout=300):
    key = served["key"] if key == "own" else key
    headers = {"content-type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    return httpx.request(method, served["url"] + path, headers=headers, timeout=timeout,
                         content=None if body is None else json.dumps(body))


def test_sessions_over_http(served):
    r = call(served, "POST", "/v1/collections/facts/sessions", {"user_id": "alice"})
    assert r.status_code == 201, r.text
    sid = r.json()["id"]
    q1 = call(served, "POST", "/v1/collections/facts/query", {"query": "Who built the lighthouse of Varnholm?",
                                                               "session_id": sid, **FAST})
    assert q1.status_code == 200, q1.text
    assert q1.json()["session"]["turn"] == 1
    q2 = call(served, "POST", "/v1/collections/facts/query", {"query": "In which year did she build it?",
                                                               "session_id": sid, **FAST})
    assert q2.status_code == 200 and q2.json()["session"]["turn"] == 2
    state = call(served, "GET", f"/v1/sessions/{sid}").json()
    assert state["collection"] == "facts" and state["user_id"] == "alice"
    assert [t["question"] for t in state["turns"]] == ["Who built the lighthouse of Varnholm?",
                                                       "In which year did she build it?"]
    assert state["turns"][0]["titles"] == [e["doc_id"] for e in q1.json()["evidence"]]
    # Another key (of another collection) or no key: the session does not exist for them.
    assert call(served, "GET", f"/v1/sessions/{sid}", key=served["other"]).status_code == 404
    assert call(served, "GET", f"/v1/sessions/{sid}", key=None).status_code == 401
    r = call(served, "POST", "/v1/collections/facts/query", {"query": "When?", "session_id": "NoSuchSession1",
                                                              **FAST})
    assert r.status_code == 404 and "does not exist or has expired" in r.json()["error"]["message"]
    r = call(served, "POST", "/v1/collections/facts/query", {"query": "When?", "session_id": "../x", **FAST})
    assert r.status_code == 400 and "session id" in r.json()["error"]["message"]
    assert call(served, "GET", "/v1/sessions/bad id!").status_code in (400, 404)
    d = call(served, "DELETE", f"/v1/sessions/{sid}")
    assert d.status_code == 200 and d.json() == {"id": sid, "deleted": True, "turn_count": 2}
    assert call(served, "GET", f"/v1/sessions/{sid}").status_code == 404
    # Ending the session fed alice's memory (2 turns < user_every, so it happened at the end); delete it.
    assert call(served, "DELETE", "/v1/users/alice").json()["deleted"] is True
    assert call(served, "DELETE", "/v1/users/alice").status_code == 404


def test_chat_history_is_a_session_and_is_bounded(served):
    msgs = [{"role": "user", "content": "Who built the lighthouse of Varnholm?"},
            {"role": "assistant", "content": "Elsa Brandt built it."},
            {"role": "user", "content": "In which year?"}]
    r = call(served, "POST", "/v1/chat/completions", {"model": "facts", "messages": msgs, "max_tokens": 4,
                                                       "task": "qa", "top_k": 2})
    assert r.status_code == 200, r.text
    s = r.json()["memorag"]["session"]
    assert s["session_id"].startswith("chat-") and s["turn"] == 2
    too_long = msgs * 3
    r = call(served, "POST", "/v1/chat/completions", {"model": "facts", "messages": too_long, "max_tokens": 4})
    assert r.status_code == 413 and "messages" in r.json()["error"]["message"]


def test_rotated_key_reaches_the_tenants_memories_and_a_user_delete_leaves_nothing(served):
    """Sessions belong to the key's tenant: after the key is revoked and a new one created for the same tenant,
    the session is still there. DELETE /v1/users/{id} then removes the user memory and every session naming
    the user: no object of the store holds the user id or their questions afterwards."""
    keys = ApiKeyStore(served["store"])
    old, old_key = keys.create("facts", tenant="acme")
    uid, q1, q2 = "dana.ray@example.org", "Who keeps the Pellam orchard?", "What does the cider press run on?"
    sid = call(served, "POST", "/v1/collections/facts/sessions", {"user_id": uid}, key=old_key).json()["id"]
    for q in (q1, q2):
        r = call(served, "POST", "/v1/collections/facts/query", {"query": q, "session_id": sid, **FAST}, key=old_key)
        assert r.status_code == 200, r.text
    chat = [{"role": "user", "content": q1}, {"role": "assistant", "content": "A family."},
            {"role": "user", "content": q2}]
    r = call(served, "POST", "/v1/chat/completions", {"model": "facts", "messages": chat, "max_tokens": 2,
                                                       "task": "qa", "top_k": 1, "user": uid}, key=old_key)
    assert r.status_code == 200, r.text
    keys.revoke("facts", old.key_id)
    _, new_key = keys.create("facts", tenant="acme")
    assert call(served, "GET", f"/v1/sessions/{sid}", key=old_key).status_code == 401
    assert call(served, "GET", f"/v1/sessions/{sid}", key=new_key).json()["user_id"] == uid
    assert call(served, "GET", f"/v1/sessions/{sid}", key=served["key"]).status_code == 404  # another tenant
    d = call(served, "DELETE", f"/v1/users/{uid}", key=new_key)
    assert d.status_code == 200 and d.json()["sessions"] == 2, d.text
    assert call(served, "GET", f"/v1/sessions/{sid}", key=new_key).status_code == 404
    for path in Path(served["store"]).rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert uid.encode() not in data and q1.encode() not in data and q2.encode() not in data, path


def test_web_page_is_served_from_the_package(served):
    r = httpx.get(served["url"] + "/")
    assert r.status_code == 200 and "text/html" in r.headers["content-type"]
    assert "default-src 'self'" in r.headers["content-security-policy"]
    assert 'src="static/app.js"' in r.text and "http" not in r.text.split("<body>")[1].replace("https://", "")[:0]
    assert httpx.get(served["url"] + "/static/app.js").status_code == 200
    assert httpx.get(served["url"] + "/static/style.css").status_code == 200
    assert httpx.get(served["url"] + "/static/..%2Fapp.py").status_code == 404
    assert httpx.get(served["url"] + "/static/secret.txt").status_code == 404


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    if not shutil.which("chromium") or not shutil.which("chromedriver"):
        pytest.skip("Debian chromium and chromium-driver are not installed (.ci/run installs them)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = shutil.which("chromium")
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1280,1000",
                 f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=opts)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


def test_web_page_in_a_real_browser(served, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import Select, WebDriverWait

    d = browser
    wait = WebDriverWait(d, 300, poll_frequency=0.25)
    d.get(served["url"] + "/")
    # A wrong key: the error is shown to the user, in words.
    d.find_element(By.ID, "api-key").send_keys("mrg_0123456789abcdef_wrongwrongwrongwrongwrong")
    d.find_element(By.ID, "collection").send_keys("facts")
    Select(d.find_element(By.ID, "task")).select_by_value("qa")
    for fid, v in (("top-k", "3"), ("max-tokens", "8")):
        el = d.find_element(By.ID, fid)
        el.clear()
        el.send_keys(v)
    q = d.find_element(By.ID, "question")
    q.send_keys("Who built the lighthouse of Varnholm?")
    q.send_keys(Keys.CONTROL, Keys.ENTER)  # keyboard: Ctrl+Enter asks
    err = wait.until(ec.visibility_of_element_located((By.ID, "error")))
    assert "401" in err.text and "key" in err.text.lower()
    d.save_screenshot(str(tmp_path / "wrong_key.png"))
    # The right key: kept in session storage only.
    key_box = d.find_element(By.ID, "api-key")
    key_box.clear()
    key_box.send_keys(served["key"])
    assert d.execute_script("return sessionStorage.getItem('memorag.apiKey')") == served["key"]
    assert d.execute_script("return localStorage.length") == 0
    d.find_element(By.ID, "ask").click()
    wait.until(lambda drv: drv.find_elements(By.CSS_SELECTOR, "#evidence li .doc"))
    assert not d.find_element(By.ID, "error").is_displayed()
    answer = d.find_element(By.ID, "answer")
    assert int(answer.get_attribute("data-tokens") or 0) >= 1  # it arrived as streamed token events
    docs = [e.text for e in d.find_elements(By.CSS_SELECTOR, "#evidence li .doc")]
    assert docs[0] == "lighthouse"
    marks = [m.text.lower() for m in d.find_elements(By.CSS_SELECTOR, "#evidence li mark")]
    assert "lighthouse" in marks or "varnholm" in marks  # the matched text is highlighted
    stages = [th.text for th in d.find_elements(By.CSS_SELECTOR, "#timings tbody th")]
    assert {"retrieve", "generate", "total"} <= set(stages)
    d.save_screenshot(str(tmp_path / "answer.png"))
    # A conversation: the follow-up is answered in a session and both turns show.
    d.find_element(By.ID, "converse").click()
    assert d.find_element(By.ID, "new-session").is_displayed()
    for text in ("Who built the lighthouse of Varnholm?", "When did she build it?"):
        q = d.find_element(By.ID, "question")
        q.clear()
        q.send_keys(text)
        d.find_element(By.ID, "ask").click()
        wait.until(lambda drv: drv.find_element(By.ID, "ask").is_enabled()
                   and drv.find_element(By.ID, "question").get_attribute("value") == "")
    turns = d.find_elements(By.CSS_SELECTOR, "#turns > li")
    assert len(turns) == 2 and "When did she build it?" in turns[1].text
    sid = d.find_element(By.ID, "session-id").text
    state = call(served, "GET", f"/v1/sessions/{sid}").json()
    assert state["turn_count"] == 2
    d.save_screenshot(str(tmp_path / "conversation.png"))
    if os.environ.get("MEMORAG_DOCS_SCREENSHOT") == "1":
        shutil.copy(tmp_path / "conversation.png", Path(__file__).resolve().parents[3] / "docs" / "web_page.png")
    # A narrow screen: one column, nothing wider than the viewport.
    d.set_window_size(400, 900)
    width = d.execute_script("return document.documentElement.scrollWidth")
    assert width <= 400 + 2, width
    d.save_screenshot(str(tmp_path / "narrow.png"))
    assert all((tmp_path / f).stat().st_size > 1000 for f in ("wrong_key.png", "answer.png", "conversation.png"))
