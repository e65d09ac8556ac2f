// The classify page: send a photo, show the top-k, which path it took and why, System 2's question and
// answer, and the support images of the top candidates.
"use strict";
const $ = id => document.getElementById(id);
let ready = false;
let last = null;  // the photo shown and its answer: what a correction is about
const NEW_CLASS = "__new__";

async function classify(file) {
  if (!ready) { $("status").textContent = "the server is not ready yet"; return; }
  const photo = $("photo");
  photo.src = URL.createObjectURL(file);
  photo.hidden = false;
  $("status").textContent = "classifying " + file.name + "…";
  $("result").hidden = true; $("evidence").hidden = true;
  last = null;
  const form = new FormData();
  form.append("image", file, file.name);
  try {
    const r = await fgvr.json("/v1/classify", { method: "POST", body: form });
    show(r);
    last = { file, answer: r };
    $("status").textContent = file.name;
  } catch (e) {
    $("status").textContent = `refused (${e.status || "error"}): ${e.message}`;
  }
}

function show(r) {
  $("top1").textContent = r.unknown ? "unknown (none of this base's classes)" : r.prediction_name;
  $("confidence").textContent = fgvr.pct(r.confidence);
  const path = $("path");
  path.textContent = r.path_taken;
  path.className = "badge " + (r.path_taken === "fast" ? "fast" : r.path_taken === "slow" ? "slow" : "other");
  $("why").textContent = r.why;
  const t = r.trigger || {};
  $("score").textContent = fgvr.num(t.score);
  $("threshold").textContent = fgvr.num(t.threshold);
  const inp = t.inputs || {};
  $("t-top1").textContent = fgvr.num(inp.top1_prob);
  $("t-margin").textContent = fgvr.num(inp.margin);
  $("t-entropy").textContent = fgvr.num(inp.entropy);
  $("t-precision").textContent = fgvr.num(inp.precision_lb) + (inp.precision_total != null ? ` (${inp.precision_correct}/${inp.precision_total})` : "");
  const clamp = x => Math.max(0, Math.min(1, Number(x) || 0));
  $("gauge-score").style.width = (100 * clamp(t.score)).toFixed(1) + "%";
  $("gauge-score").className = t.go_slow ? "slow" : "fast";
  $("gauge-threshold").style.left = (100 * clamp(t.threshold)).toFixed(1) + "%";

  const body = $("candidates").querySelector("tbody");
  body.replaceChildren();
  r.candidates.forEach((c, i) => {
    const bar = fgvr.el("div", { class: "bar" + (i === 0 ? " top" : "") });
    bar.style.width = (100 * c.score).toFixed(1) + "%";
    body.append(fgvr.el("tr", { class: i === 0 ? "top" : "" },
      fgvr.el("td", { class: "label", text: c.name }),
      fgvr.el("td", { class: "score", text: fgvr.pct(c.score) }),
      fgvr.el("td", { class: "barcell" }, bar),
      fgvr.el("td", { class: "small muted", text: fgvr.pct(c.fast) }),
      fgvr.el("td", { class: "small muted", text: c.slow == null ? "–" : fgvr.pct(c.slow) })));
  });

  const s2 = r.system2;
  $("system2").hidden = !s2;
  if (s2) {
    $("s2-name").textContent = s2.name + (s2.ran ? "" : " (did not answer)");
    $("s2-question").textContent = s2.question || "";
    $("s2-answer").textContent = s2.answer || (s2.error ? "no answer: " + s2.error : "–");
    $("s2-decision").hidden = !s2.decision;
    $("s2-combined").textContent = s2.decision || "";
    $("s2-rationale").hidden = !s2.rationale;
    $("s2-rationale").textContent = s2.rationale ? "why: " + s2.rationale : "";
    $("s2-rules").hidden = !(s2.rules_used && s2.rules_used.length);
    $("s2-rules").textContent = "experience rules used: " + (s2.rules_used || []).join(", ");
  }
  const tm = r.timings_ms || {};
  $("timings").textContent = "server time " + Object.entries(tm).map(([k, v]) => `${k} ${Number(v).toFixed(1)} ms`).join(" · ");

  const support = $("support");
  support.replaceChildren();
  r.candidates.slice(0, 3).forEach(c => {
    const row = fgvr.el("div", { class: "support-row" }, fgvr.el("div", { class: "support-label", text: c.name }));
    for (const s of c.support || []) {
      const img = fgvr.el("img", { alt: c.name + " support image " + s.index, title: s.similarity == null ? "" : "similarity " + fgvr.num(s.similarity) });
      fgvr.image(img, s.url);
      row.append(fgvr.el("figure", {}, img, fgvr.el("figcaption", { class: "small muted", text: s.similarity == null ? "#" + s.index : "sim " + fgvr.num(s.similarity, 2) })));
    }
    support.append(row);
  });
  $("result").hidden = false;
  $("evidence").hidden = false;
  $("correct").hidden = true;
  $("wrong").hidden = false;
  $("correct-status").textContent = "";
}

// "wrong?": pick the right class from the base's own (or name a new one); the photo goes to the review queue.
async function openCorrection() {
  if (!last) return;
  const sel = $("correct-class");
  sel.replaceChildren();
  try {
    const cls = (await fgvr.json("/v1/classes")).classes;
    for (const c of cls) {
      if (c.name !== last.answer.prediction_name) sel.append(fgvr.el("option", { value: String(c.id), text: c.name }));
    }
  } catch (e) { $("correct-status").textContent = "cannot list the classes: " + e.message; return; }
  sel.append(fgvr.el("option", { value: NEW_CLASS, text: "another class (not listed)…" }));
  $("correct-new-row").hidden = sel.value !== NEW_CLASS;
  $("correct").hidden = false;
  $("wrong").hidden = true;
  sel.focus();
}

async function sendCorrection(e) {
  e.preventDefault();
  if (!last) return;
  const form = new FormData();
  form.append("image", last.file, last.file.name);
  const pick = $("correct-class").value;
  if (pick === NEW_CLASS) {
    const name = $("correct-new").value.trim();
    if (!name) { $("correct-status").textContent = "name the new class"; $("correct-new").focus(); return; }
    form.append("label", name);
  } else form.append("class_id", pick);
  const who = $("correct-name").value.trim();
  if (who) form.append("name", who);
  const a = last.answer;
  form.append("replaced", JSON.stringify({ prediction: a.prediction, prediction_name: a.prediction_name,
    confidence: a.confidence, path_taken: a.path_taken, rules_used: (a.system2 && a.system2.rules_used) || [] }));
  $("correct-send").disabled = true;
  try {
    const c = await fgvr.json("/v1/corrections", { method: "POST", body: form });
    $("correct").hidden = true;
    $("correct-status").textContent = `thank you: correction ${c.id} (${c.label}) is queued for review`;
    $("correct-status").dataset.id = c.id;
  } catch (err) {
    $("correct-status").textContent = `refused (${err.status || "error"}): ${err.message}`;
  } finally { $("correct-send").disabled = false; }
}

$("wrong").addEventListener("click", openCorrection);
$("correct").addEventListener("submit", sendCorrection);
$("correct-cancel").addEventListener("click", () => { $("correct").hidden = true; $("wrong").hidden = false; });
$("correct-class").addEventListener("change", () => { $("correct-new-row").hidden = $("correct-class").value !== NEW_CLASS; });

$("file").addEventListener("change", e => { if (e.target.files[0]) classify(e.target.files[0]); });
const drop = $("drop");
drop.addEventListener("keydown", e => {  // the drop zone is a button for the keyboard: it opens the file picker
  if (e.target === drop && (e.key === "Enter" || e.key === " ")) { e.preventDefault(); $("file").click(); }
});
drop.addEventListener("dragover", e => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", e => {
  e.preventDefault(); drop.classList.remove("over");
  const f = e.dataTransfer.files[0];
  if (f) classify(f);
});
fgvr.start(() => { ready = true; $("status").textContent = "ready"; document.body.dataset.ready = "1"; });
