// memorag web page: ask a collection through the native API, stream the answer (server-sent events over fetch),
// show clues, evidence and stage timings; optional conversation (session) and user memory.
// Untrusted text (answers, passages, errors) only ever enters the page through textContent.
"use strict";

(function () {
  const $ = (id) => document.getElementById(id);
  const KEY_STORE = "memorag.apiKey";
  const STOP = new Set(("a an and are as at be by did do does for from had has have he her his how i in is it its " +
    "of on or she that the their them they this to was were what when where which who whom whose why will with " +
    "you your").split(" "));
  let controller = null;
  let session = null; // {id, collection, turns: []}

  // -- key: this tab's session storage only --------------------------------------------------------------------
  $("api-key").value = sessionStorage.getItem(KEY_STORE) || "";
  $("api-key").addEventListener("input", () => sessionStorage.setItem(KEY_STORE, $("api-key").value.trim()));

  function headers(json) {
    const h = {};
    const key = $("api-key").value.trim();
    if (key) h["Authorization"] = "Bearer " + key;
    if (json) h["Content-Type"] = "application/json";
    return h;
  }

  // -- errors -----------------------------------------------------------------------------------------------------
  class ApiError extends Error {
    constructor(status, message, retryAfter) { super(message); this.status = status; this.retryAfter = retryAfter; }
  }

  async function failure(resp) {
    let msg = resp.statusText || "request failed";
    try { const body = await resp.json(); if (body && body.error && body.error.message) msg = body.error.message; }
    catch (e) { /* not JSON */ }
    return new ApiError(resp.status, msg, resp.headers.get("Retry-After"));
  }

  function explain(err) {
    const s = err.status;
    if (s === 401) return ["The API key was not accepted (401).", "Paste a valid key for this collection. " + err.message];
    if (s === 403) return ["This key does not open that collection (403).", err.message];
    if (s === 404) return ["Not found (404).", err.message];
    if (s === 413) return ["Too much input (413).", err.message];
    if (s === 429) return ["Too many requests (429).", "The service is busy; retry" +
      (err.retryAfter ? " in " + err.retryAfter + " s." : " in a moment.") + " " + err.message];
    if (s === 400 || s === 422) return ["The request was refused (" + s + ").", err.message];
    if (s === 503) return ["The service is unavailable (503).", "Retry in a moment. " + err.message];
    if (s) return ["Error " + s + ".", err.message];
    return ["Could not reach the service.", err.message];
  }

  function showError(err) {
    const box = $("error");
    box.replaceChildren();
    if (!err) { box.hidden = true; return; }
    const [title, detail] = explain(err);
    const strong = document.createElement("strong");
    strong.textContent = title;
    const p = document.createElement("span");
    p.textContent = detail;
    box.append(strong, p);
    box.hidden = false;
  }

  function status(text) { $("status").textContent = text; }

  // -- collections ------------------------------------------------------------------------------------------------
  async function loadCollections() {
    showError(null);
    try {
      const resp = await fetch("v1/collections", { headers: headers(false) });
      if (!resp.ok) throw await failure(resp);
      const body = await resp.json();
      const list = $("collections");
      list.replaceChildren();
      for (const c of body.collections || []) {
        const o = document.createElement("option");
        o.value = c.name;
        o.label = c.name + (c.version ? " (" + c.documents + " documents)" : " (not published)");
        list.append(o);
      }
      if (!$("collection").value && body.collections && body.collections.length) {
        $("collection").value = body.collections[0].name;
      }
      status((body.collections || []).length + " collection(s)");
    } catch (err) { showError(err); }
  }
  $("load-collections").addEventListener("click", loadCollections);

  // -- sessions ---------------------------------------------------------------------------------------------------
  async function ensureSession(collection) {
    if (session && session.collection === collection) return session;
    const body = {};
    const user = $("user-id").value.trim();
    if (user) body.user_id = user;
    const resp = await fetch("v1/collections/" + encodeURIComponent(collection) + "/sessions",
      { method: "POST", headers: headers(true), body: JSON.stringify(body) });
    if (!resp.ok) throw await failure(resp);
    const s = await resp.json();
    session = { id: s.id, collection: collection, turns: [] };
    renderConversation();
    return session;
  }

  async function endSession() {
    if (!session) return;
    const id = session.id;
    session = null;
    renderConversation();
    try { await fetch("v1/sessions/" + encodeURIComponent(id), { method: "DELETE", headers: headers(false) }); }
    catch (e) { /* the session expires anyway */ }
  }

  function renderConversation() {
    const on = $("converse").checked;
    $("new-session").hidden = !on;
    $("conversation").hidden = !on || !session || !session.turns.length;
    $("session-id").textContent = session ? session.id : "";
    const ol = $("turns");
    ol.replaceChildren();
    for (const t of (session ? session.turns : [])) {
      const li = document.createElement("li");
      const q = document.createElement("div"); q.className = "q"; q.textContent = t.question;
      li.append(q);
      if (t.standalone) {
        const s = document.createElement("div"); s.className = "standalone";
        s.textContent = "understood as: " + t.standalone; li.append(s);
      }
      const a = document.createElement("div"); a.className = "a"; a.textContent = t.answer || "(no answer)";
      li.append(a);
      ol.append(li);
    }
  }
  $("converse").addEventListener("change", () => { if (!$("converse").checked) endSession(); renderConversation(); });
  $("new-session").addEventListener("click", () => { endSession(); $("question").focus(); });

  // -- rendering --------------------------------------------------------------------------------------------------
  function words(text) {
    return (text || "").toLowerCase().match(/[\p{L}\p{N}]+/gu) || [];
  }

  // The passage with the words it shares with the question / the query that found it highlighted.
  function highlighted(text, queries) {
    const terms = new Set();
    for (const q of queries) for (const w of words(q)) if (w.length > 2 && !STOP.has(w)) terms.add(w);
    const p = document.createElement("p");
    const re = /[\p{L}\p{N}]+/gu;
    let last = 0, m;
    while ((m = re.exec(text)) !== null) {
      if (!terms.has(m[0].toLowerCase())) continue;
      if (m.index > last) p.append(document.createTextNode(text.slice(last, m.index)));
      const mark = document.createElement("mark"); mark.textContent = m[0]; p.append(mark);
      last = m.index + m[0].length;
    }
    if (last < text.length) p.append(document.createTextNode(text.slice(last)));
    return p;
  }

  function renderEvidence(evidence, question) {
    const ol = $("evidence");
    ol.replaceChildren();
    for (const e of evidence || []) {
      const li = document.createElement("li");
      const meta = document.createElement("div"); meta.className = "meta";
      const doc = document.createElement("span"); doc.className = "doc"; doc.textContent = e.doc_id;
      meta.append(doc, document.createTextNode(" · score " + Number(e.score).toFixed(4) +
        (e.sources && e.sources.length ? " · found by " + e.sources.join(", ") : "")));
      li.append(meta, highlighted(e.text || "", [question, e.query || ""]));
      ol.append(li);
    }
    if (!ol.children.length) {
      const li = document.createElement("li"); li.className = "empty"; li.textContent = "No passages."; ol.append(li);
    }
  }

  function list(title, items) {
    const div = document.createElement("div"); div.className = "clue-unit";
    const h = document.createElement("div"); h.className = "meta"; h.textContent = title; div.append(h);
    const ul = document.createElement("ul");
    for (const it of items) { const li = document.createElement("li"); li.textContent = it; ul.append(li); }
    div.append(ul);
    return div;
  }

  function renderClues(result) {
    const box = $("clues");
    box.replaceChildren();
    const s = result.session;
    if (s) {
      if (s.standalone) box.append(list("session: standalone question", [s.standalone]));
      if (s.session_recalls && s.session_recalls.length) box.append(list("session: recalled", s.session_recalls));
      if (s.user_pointed && s.user_pointed.length) box.append(list("user memory: pointed at", s.user_pointed));
      if (s.user_recalls && s.user_recalls.length) box.append(list("user memory: recalled", s.user_recalls));
    }
    for (const c of result.clues || []) {
      const items = [].concat(c.spans || [], c.surrogates || [], c.draft ? ["draft: " + c.draft] : [],
        c.key_points || []);
      box.append(list("unit " + String(c.unit_id).slice(0, 12) + (c.cached ? " (cached)" : ""),
        items.length ? items : ["(no clues)"]));
    }
    if (!box.children.length) {
      const p = document.createElement("p"); p.className = "empty"; p.textContent = "No clues for this task.";
      box.append(p);
    }
  }

  function renderTimings(timings) {
    const tbody = $("timings").querySelector("tbody");
    tbody.replaceChildren();
    for (const [k, v] of Object.entries(timings || {})) {
      const tr = document.createElement("tr");
      const th = document.createElement("th"); th.scope = "row"; th.textContent = k;
      const td = document.createElement("td"); td.textContent = Number(v).toFixed(3);
      tr.append(th, td); tbody.append(tr);
    }
  }

  // -- asking -----------------------------------------------------------------------------------------------------
  function intField(id, name) {
    const v = $(id).value.trim();
    if (!/^\d+$/.test(v)) throw new ApiError(0, name + " must be a whole number");
    return parseInt(v, 10);
  }

  async function* sseEvents(resp) {
    const reader = resp.body.getReader();
    const decoder = new TextDecoder();
    let buf = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += decoder.decode(value, { stream: true }).replace(/\r\n/g, "\n");
      let i;
      while ((i = buf.indexOf("\n\n")) >= 0) {
        const block = buf.slice(0, i); buf = buf.slice(i + 2);
        let event = "message"; const data = [];
        for (const line of block.split("\n")) {
          if (line.startsWith("event:")) event = line.slice(6).trim();
          else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
        }
        if (data.length) yield { event, data: JSON.parse(data.join("\n")) };
      }
    }
  }

  async function ask(ev) {
    if (ev) ev.preventDefault();
    showError(null);
    const collection = $("collection").value.trim();
    const question = $("question").value.trim();
    try {
      if (!collection) throw new ApiError(0, "Pick a collection first.");
      if (!question) throw new ApiError(0, "Write a question first.");
      const body = { query: question, task: $("task").value, top_k: intField("top-k", "Passages"),
        max_new_tokens: intField("max-tokens", "Answer tokens"), stream: true };
      const user = $("user-id").value.trim();
      if (user) body.user_id = user;
      $("ask").disabled = true; $("stop").disabled = false;
      $("answer").textContent = ""; $("answer").setAttribute("aria-busy", "true");
      status("asking...");
      if ($("converse").checked) body.session_id = (await ensureSession(collection)).id;
      controller = new AbortController();
      const t0 = performance.now();
      const resp = await fetch("v1/collections/" + encodeURIComponent(collection) + "/query",
        { method: "POST", headers: headers(true), body: JSON.stringify(body), signal: controller.signal });
      if (!resp.ok) throw await failure(resp);
      let final = null, tokens = 0;
      for await (const e of sseEvents(resp)) {
        if (e.event === "token") {
          $("answer").append(document.createTextNode(e.data.text));
          $("answer").dataset.tokens = String(++tokens);
          status("answering... " + ((performance.now() - t0) / 1000).toFixed(1) + " s");
        } else if (e.event === "final") {
          final = e.data;
        } else if (e.event === "error") {
          const er = e.data.error || {};
          throw new ApiError(er.code || 500, er.message || "the answer failed");
        }
      }
      if (!final) throw new ApiError(0, "the stream ended without a final event");
      $("answer").textContent = final.answer || "(empty answer)";
      renderClues(final); renderEvidence(final.evidence, question); renderTimings(final.timings);
      if (session && body.session_id === session.id) {
        session.turns.push({ question, answer: final.answer,
          standalone: final.session ? final.session.standalone : null });
        renderConversation();
        $("question").value = "";
      }
      status("done in " + ((performance.now() - t0) / 1000).toFixed(1) + " s");
    } catch (err) {
      if (err.name === "AbortError") { status("stopped"); }
      else {
        if (err.status === 404 && session && /session/i.test(err.message)) session = null; // expired: start anew
        showError(err); status("");
      }
    } finally {
      $("ask").disabled = false; $("stop").disabled = true; controller = null;
      $("answer").setAttribute("aria-busy", "false");
    }
  }

  $("ask-form").addEventListener("submit", ask);
  $("stop").addEventListener("click", () => { if (controller) controller.abort(); });
  $("question").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) { e.preventDefault(); $("ask-form").requestSubmit(); }
  });
  renderConversation();
  if ($("api-key").value) loadCollections();
})();
