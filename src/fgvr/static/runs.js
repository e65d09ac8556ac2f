// The runs page: an evaluation run's confusion matrix; a click on a cell shows its images with candidates.
"use strict";
const $ = id => document.getElementById(id);
let current = null;

async function loadRun(name) {
  const s = await fgvr.json("/v1/runs/" + encodeURIComponent(name));
  current = s;
  $("run-summary").textContent = `${s.n_images} images · accuracy ${fgvr.pct(s.accuracy)} · System 1 alone ` +
    `${fgvr.pct(s.accuracy_system1_alone)} · slow-path rate ${fgvr.pct(s.slow_rate)} · errors ${s.n_errors ?? 0}`;
  const conf = s.confusion || { classes: [], matrix: [] };
  const m = conf.matrix, classes = conf.classes;
  const max = Math.max(1, ...m.flat());
  const table = $("matrix");
  table.replaceChildren();
  const head = fgvr.el("tr", {}, fgvr.el("th", { text: "true \\ predicted" }));
  classes.forEach(c => head.append(fgvr.el("th", { class: "col", text: c })));
  table.append(head);
  m.forEach((row, i) => {
    const tr = fgvr.el("tr", {}, fgvr.el("th", { text: classes[i] }));
    row.forEach((n, j) => {
      const td = fgvr.el("td", { class: "cell" + (i === j ? " diag" : "") + (n ? " some" : ""), text: n ? String(n) : "",
                                 "data-true": i, "data-pred": j });
      td.style.setProperty("--level", (n / max).toFixed(3));
      if (n) td.addEventListener("click", () => showCell(name, i, j, classes));
      tr.append(td);
    });
    table.append(tr);
  });
  $("cell").hidden = true;
}

async function showCell(name, t, p, classes) {
  let c;
  try {
    c = await fgvr.json(`/v1/runs/${encodeURIComponent(name)}/cell?true=${t}&pred=${p}`);
  } catch (e) {  // e.g. 409: the run's results were written by a newer fgvr; say so instead of nothing
    $("cell-title").textContent = e.message;
    $("cell-items").replaceChildren();
    $("cell").hidden = false;
    return;
  }
  $("cell-title").textContent = `true ${classes[t]} → predicted ${classes[p]}: ${c.count} image(s)` +
    (c.items.length < c.count ? ` (first ${c.items.length} shown)` : "");
  const box = $("cell-items");
  box.replaceChildren();
  for (const it of c.items) {
    const img = fgvr.el("img", { alt: it.file });
    fgvr.image(img, it.image);
    const list = fgvr.el("ol", { class: "small" });
    for (const cand of it.candidates) {
      list.append(fgvr.el("li", { text: `${cand.name} ${fgvr.pct(cand.score)}` + (cand.slow != null ? ` (S1 ${fgvr.pct(cand.fast)}, S2 ${fgvr.pct(cand.slow)})` : "") }));
    }
    box.append(fgvr.el("div", { class: "item" }, img,
      fgvr.el("div", {}, fgvr.el("div", { class: "small", text: it.file }),
        fgvr.el("span", { class: "badge " + (it.path_taken === "fast" ? "fast" : it.path_taken === "slow" ? "slow" : "other"), text: it.path_taken }),
        fgvr.el("span", { class: "small muted", text: ` doubt ${fgvr.num(it.trigger.score)} vs ${fgvr.num(it.trigger.threshold)}` }),
        list)));
  }
  $("cell").hidden = false;
}

fgvr.start(async () => {
  const r = await fgvr.json("/v1/runs");
  const sel = $("run");
  sel.replaceChildren(...r.runs.map(x => fgvr.el("option", { value: x.name, text: `${x.name} (${x.n_images} images)` })));
  sel.addEventListener("change", () => loadRun(sel.value));
  if (r.runs.length) await loadRun(r.runs[0].name); else $("run-summary").textContent = "no evaluation runs found";
  document.body.dataset.ready = "1";
});
