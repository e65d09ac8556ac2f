// Shared by the pages: the bearer token (kept in this tab only), JSON and image fetches, small helpers.
"use strict";
const fgvr = {
  token() { return sessionStorage.getItem("fgvr-token") || ""; },
  headers() { const t = fgvr.token(); return t ? { Authorization: "Bearer " + t } : {}; },
  async json(url, options = {}) {
    const r = await fetch(url, { ...options, headers: { ...fgvr.headers(), ...(options.headers || {}) } });
    let body = null;
    try { body = await r.json(); } catch (e) { body = { detail: r.statusText }; }
    if (r.status === 401) fgvr.askToken();
    if (!r.ok) { const err = new Error(body.detail || r.statusText); err.status = r.status; throw err; }
    return body;
  },
  // Images go through fetch so the token travels in a header (an <img src> cannot send one).
  async image(img, url) {
    const r = await fetch(url, { headers: fgvr.headers() });
    if (!r.ok) { img.alt = "(not available)"; return; }
    img.src = URL.createObjectURL(await r.blob());
  },
  el(tag, props = {}, ...children) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(props)) {
      if (k === "class") e.className = v; else if (k === "text") e.textContent = v; else e.setAttribute(k, v);
    }
    for (const c of children) e.append(c);
    return e;
  },
  pct(x) { return x == null ? "–" : (100 * x).toFixed(1) + "%"; },
  num(x, d = 3) { return x == null ? "–" : Number(x).toFixed(d); },
  askToken() {
    document.getElementById("token-box").hidden = false;
  },
  async start(onReady) {
    document.getElementById("token-save").addEventListener("click", () => {
      sessionStorage.setItem("fgvr-token", document.getElementById("token").value.trim());
      document.getElementById("token-box").hidden = true;
      fgvr.start(onReady);
    });
    const info = document.getElementById("info");
    for (let i = 0; i < 600; i++) {  // wait for the models (bounded: 10 minutes)
      const r = await fetch("/healthz");
      const h = await r.json();
      if (h.status === "ready") {
        if (h.auth && !fgvr.token()) { fgvr.askToken(); info.textContent = "token needed"; return; }
        try {
          const s = await fgvr.json("/v1/info");
          info.textContent = `${s.classes} classes · encoder ${s.encoder || "?"} · System 2: ${s.system2 || "none"}` +
            (s.base_version != null ? ` · base version ${s.base_version}` : "") + ` · trigger threshold ${fgvr.num(s.threshold)}` + (s.budget != null ? ` (budget ${fgvr.pct(s.budget)}, calibrated on the support set)` : "");
          const link = document.getElementById("runs-link");
          if (link) link.hidden = !s.runs;
          onReady(s);
        } catch (e) { info.textContent = e.message; }
        return;
      }
      if (h.status === "failed") { info.textContent = "the server could not load its models: " + h.error; return; }
      info.textContent = "loading the models…";
      await new Promise(res => setTimeout(res, 1000));
    }
  },
};
