// fleetctl dashboard: live updates over Server-Sent Events, no build step.
"use strict";
(function () {
  const body = document.body;
  const topic = body.dataset.topic;
  const csrf = body.dataset.csrf;

  function el(tag, attrs, ...kids) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k === "class") e.className = v; else e.setAttribute(k, v === true ? "" : v);
    }
    for (const k of kids) if (k !== null && k !== undefined) e.append(k instanceof Node ? k : String(k));
    return e;
  }
  const badge = (s, cls) => el("span", { class: "badge " + (cls || "st-" + s) }, s);
  // as `fleetctl rollout status` labels them: canaries, then "batch N"; nodes skipped at the start are in no batch
  const batchLabel = (canary, index) => canary ? "canary" : (index >= 0 ? "batch " + index : "none");
  const sim = (flag) => flag ? el("span", { class: "badge sim", title: "GPU hardware simulated from a profile" }, "simulated") : null;

  // confirmation for dangerous actions
  document.addEventListener("submit", (ev) => {
    const btn = ev.submitter;
    if (btn && btn.dataset.confirm && !window.confirm(btn.dataset.confirm)) ev.preventDefault();
  });

  // ---- renderers per topic -------------------------------------------------------------------
  function renderOverview(data) {
    const ov = data.overview;
    const set = (key, v) => { const n = document.querySelector(`[data-count="${key}"]`); if (n) n.textContent = v; };
    set("total", ov.total); set("failing", ov.failing_count); set("simulated", ov.simulated);
    for (const [s, n] of Object.entries(ov.by_status)) set("status:" + s, n);
    const tb = document.querySelector("#failing tbody");
    if (tb) {
      tb.replaceChildren(...(ov.failing.length ? ov.failing.map((n) => el("tr", {},
        el("td", {}, el("a", { href: "/nodes/" + encodeURIComponent(n.hostname) }, n.hostname), " ", sim(n.simulated)),
        el("td", {}, badge(n.status), " ", ["failed", "timeout"].includes(n.job_status) ? badge(`${n.job_kind} ${n.job_status}`, "st-failed") : null),
        el("td", {}, n.gpu),
        el("td", {}, n.fa_version || "none", " ", el("span", { class: "muted" }, n.fa_variant)),
        el("td", {}, n.verify_result ? badge(n.verify_result, "v-" + n.verify_result) : el("span", { class: "muted" }, "never"))))
        : [el("tr", {}, el("td", { colspan: 5, class: "muted" }, "No failing nodes."))]));
    }
    const ul = document.getElementById("overview-rollouts");
    if (ul && data.rollouts) {
      ul.replaceChildren(...data.rollouts.map((r) => el("li", {},
        el("a", { href: "/rollouts/" + encodeURIComponent(r.id) }, r.id), " ", badge(r.status), " ",
        el("span", { class: "muted" }, `${r.version || ""} · ${r.done}/${r.total}`))));
    }
  }

  // Pages without a JSON renderer: fetch the same URL and swap the regions marked data-live
  // (by id), keeping the rest of the page (search box focus, scroll, open <details>) as it is.
  let refreshing = false;
  async function refreshRegions() {
    if (refreshing) return;
    refreshing = true;
    try {
      const r = await fetch(window.location.href, { credentials: "same-origin", headers: { "X-Live": "1" } });
      if (r.redirected && new URL(r.url).pathname === "/login") { window.location.href = r.url; return; }
      if (!r.ok) return;
      const doc = new DOMParser().parseFromString(await r.text(), "text/html");
      const open = new Set([...document.querySelectorAll("details[open][data-key]")].map((d) => d.dataset.key));
      const closed = new Set([...document.querySelectorAll("details[data-key]:not([open])")].map((d) => d.dataset.key));
      for (const el of document.querySelectorAll("[data-live][id]")) {
        const fresh = doc.getElementById(el.id);
        if (fresh) el.replaceWith(document.importNode(fresh, true));
      }
      for (const d of document.querySelectorAll("details[data-key]")) {
        if (open.has(d.dataset.key)) d.open = true; else if (closed.has(d.dataset.key)) d.open = false;
      }
      body.dataset.refreshes = String(Number(body.dataset.refreshes || 0) + 1);
    } finally {
      refreshing = false;
    }
  }

  function renderRollout(r) {
    if (!r) return;
    const st = document.getElementById("rollout-status");
    if (st) st.replaceChildren(badge(r.status));
    const total = r.total || 0;
    const bar = document.getElementById("progress-bar");
    if (bar) { bar.max = Math.max(total, 1); bar.value = r.done || 0; }
    const txt = document.getElementById("progress-text");
    if (txt) txt.textContent = `${r.done || 0} of ${total} nodes finished · ${r.failed || 0} failed`;
    const chips = document.getElementById("state-counts");
    if (chips) chips.replaceChildren(...Object.entries(r.by_state || {}).map(([s, n]) =>
      el("span", { class: "chip st-" + s, "data-state": s }, `${s} `, el("b", {}, n))));
    const bt = document.querySelector("#batches tbody");
    if (bt) bt.replaceChildren(...(r.batches || []).map((b) => el("tr", { "data-batch": b.index },
      el("td", {}, batchLabel(b.canary, b.index)), el("td", { class: "num" }, b.size),
      el("td", {}, badge(b.status)),
      el("td", {}, ...Object.entries(b.by_state || {}).map(([s, n]) => el("span", { class: "chip st-" + s }, `${s} ${n}`))))));
    const builds = document.querySelector("#builds tbody");
    if (builds) {
      const bs = r.builds || [];
      document.getElementById("builds-card").hidden = bs.length === 0;
      builds.replaceChildren(...bs.map((b) => el("tr", { "data-build-status": b.status, "data-builder": b.builder || "" },
        el("td", {}, badge(b.status)),
        el("td", {}, b.builder ? el("a", { href: "/nodes/" + encodeURIComponent(b.builder) }, b.builder) : el("span", { class: "muted" }, "none yet")),
        el("td", { class: "build" },
          b.artifact_filename ? el("code", { class: "wheel" }, b.artifact_filename) : null,
          b.sha256_short ? el("span", { class: "muted small", title: "sha256 " + b.artifact_sha256 }, " sha256 " + b.sha256_short + "…") : null,
          b.reused && b.rollout_id ? el("span", { class: "muted small" }, " built by ",
            el("a", { href: "/rollouts/" + encodeURIComponent(b.rollout_id) }, b.rollout_id)) : null,
          b.error ? el("div", { class: "error" }, b.error) : null,
          el("div", { class: "muted small build-key" }, "build key ",
            ...String(b.build_key).split(";").flatMap((part, i) => i ? [";", el("wbr"), part] : [part]))),
        el("td", { class: "num" }, b.attempts),
        el("td", { class: "nowrap" }, b.duration || (b.finished_at ? "" : el("span", { class: "muted" }, "not finished"))))));
    }
    const fails = document.getElementById("failures");
    if (fails) {
      const f = r.failures || [];
      document.getElementById("failures-card").hidden = f.length === 0;
      fails.replaceChildren(...f.map((x) => el("div", { class: "diag", "data-host": x.hostname },
        el("p", {}, el("a", { href: "/nodes/" + encodeURIComponent(x.hostname) }, x.hostname), " ", badge(x.state), " ",
          x.step ? el("code", {}, x.step) : null, " ", x.error || ""),
        x.diagnosis ? el("p", { class: "diag-title" }, "Diagnosis: " + (x.diagnosis.id || "unknown")) : null,
        x.diagnosis && x.diagnosis.cause ? el("p", {}, x.diagnosis.cause) : null,
        x.diagnosis && x.diagnosis.remedy ? el("p", { class: "hint" }, "What to do: " + x.diagnosis.remedy) : null)));
    }
    const nt = document.querySelector("#rollout-nodes tbody");
    if (nt) nt.replaceChildren(...(r.nodes || []).map((n) => el("tr", { "data-host": n.hostname, "data-state": n.state },
      el("td", {}, el("a", { href: "/nodes/" + encodeURIComponent(n.hostname) }, n.hostname), " ", sim(n.simulated)),
      el("td", {}, batchLabel(n.canary, n.batch)), el("td", {}, badge(n.state)),
      el("td", {}, n.variant || "", " ", el("span", { class: "muted" }, (n.steps || []).join(" → "))),
      el("td", { class: "small" }, n.error || n.detail || "",
        // a plan for a person (Windows): the commands to run by hand, one per line
        ...(n.commands && n.commands.length ? [el("pre", { class: "commands" }, n.commands.join("\n"))] : [])))));
    for (const b of document.querySelectorAll("button.act")) {
      const a = b.dataset.action;
      const s = r.status;
      b.disabled = (a === "pause" && s !== "running") || (a === "resume" && s !== "paused") ||
        (a === "abort" && !["running", "paused"].includes(s)) ||
        (a === "rollback" && ["running", "aborting", "rolling-back", "rolled-back"].includes(s));
    }
  }

  function renderer() {
    if (!topic) return null;
    if (topic === "overview") return renderOverview;
    if (topic.startsWith("rollout:")) return renderRollout;
    return null;
  }

  const snap = document.getElementById("snapshot");
  if (snap && topic && topic.startsWith("rollout:")) renderRollout(JSON.parse(snap.textContent));

  if (topic && window.EventSource) {
    const live = document.getElementById("live");
    const fn = renderer();
    const es = new EventSource("/ui/events?topic=" + encodeURIComponent(topic));
    let first = true;
    es.addEventListener("open", () => live && live.classList.add("on"));
    es.addEventListener("error", async () => {
      if (live) live.classList.remove("on");
      if (es.readyState !== EventSource.CLOSED) return;  // the browser reconnects by itself
      // closed for good: a refused reconnect (session expired, user removed) → back to the login page
      const r = await fetch("/ui/api/overview", { credentials: "same-origin" }).catch(() => null);
      if (r && r.status === 401) {
        window.location.href = "/login?next=" + encodeURIComponent(window.location.pathname + window.location.search);
      }
    });
    es.addEventListener("update", (ev) => {
      const data = JSON.parse(ev.data);
      body.dataset.updates = String(Number(body.dataset.updates || 0) + 1);
      if (fn) fn(data);
      else if (!first) refreshRegions();  // the first event describes the page just loaded
      first = false;
    });
    window.addEventListener("pagehide", () => es.close());
  }
  void csrf;
})();
