// Renders /openapi.json as a plain list of routes and record schemas (text only: no HTML from the schema).
"use strict";
const el = (tag, text, cls) => { const e = document.createElement(tag); if (text != null) e.textContent = text; if (cls) e.className = cls; return e; };
const ref = s => s && s.$ref ? s.$ref.split("/").pop() : null;
function typeOf(s) {
  if (!s) return "";
  if (ref(s)) return ref(s);
  if (s.anyOf) return s.anyOf.map(typeOf).join(" | ");
  if (s.type === "array") return typeOf(s.items) + "[]";
  return s.type || "object";
}
fetch("/openapi.json").then(r => r.json()).then(spec => {
  const routes = document.getElementById("routes");
  routes.replaceChildren(el("h2", `${spec.info.title} ${spec.info.version}`), el("p", spec.info.description || "", "muted"));
  for (const [path, ops] of Object.entries(spec.paths)) {
    for (const [method, op] of Object.entries(ops)) {
      const box = el("div", null, "item");
      const body = el("div");
      body.append(el("strong", `${method.toUpperCase()} ${path}`));
      if (op.requestBody) body.append(el("div", "body: " + Object.keys(op.requestBody.content).join(" or "), "small"));
      for (const [status, resp] of Object.entries(op.responses || {})) {
        const c = (resp.content || {})["application/json"];
        body.append(el("div", `${status}: ${c ? typeOf(c.schema) : ""} ${resp.description || ""}`, "small muted"));
      }
      box.append(body);
      routes.append(box);
    }
  }
  const schemas = document.getElementById("schemas");
  for (const [name, s] of Object.entries((spec.components || {}).schemas || {})) {
    schemas.append(el("h3", name));
    if (s.description) schemas.append(el("p", s.description, "small muted"));
    const list = el("ul", null, "small");
    for (const [field, f] of Object.entries(s.properties || {})) {
      list.append(el("li", `${field}: ${typeOf(f)}${f.description ? " — " + f.description : ""}`));
    }
    schemas.append(list);
  }
  document.body.dataset.ready = "1";
});
