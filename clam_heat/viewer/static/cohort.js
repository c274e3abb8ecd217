// clam-heat cohort page: one row per slide, sorted, filtered and paged in the browser (fast at
// tens of thousands of rows: only one page of rows is in the DOM, thumbnails load lazily).
"use strict";
(function () {
  const C = window.CLAM_HEAT;
  const PAGE = 100;
  const enc = encodeURIComponent;
  const $ = (sel) => document.querySelector(sel);
  const el = (tag, attrs = {}, ...kids) => {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs)) {
      if (k === "class") e.className = v;
      else e.setAttribute(k, v);
    }
    for (const k of kids) e.append(k);
    return e;
  };
  const COLUMNS = [
    ["thumb", ""], ["id", "slide"], ["label", "label"], ["pred", "prediction"], ["prob", "probability"],
    ["correct", "correct"], ["mean", "att. mean"], ["std", "att. std"], ["top10", "top 10 % share"],
    ["status", "status"], ["verdict", "verdict"], ["note", "note"], ["error", "error"],
  ];
  const state = { rows: [], shown: [], sort: null, desc: false, page: 0 };
  const num = (x, d) => (x == null ? "" : Number(x).toFixed(d));

  function filtered() {
    const wrong = $("#f-wrong").checked, failed = $("#f-failed").checked;
    const label = $("#f-label").value, verdict = $("#f-verdict").value;
    const text = $("#f-text").value.trim().toLowerCase();
    let rows = state.rows.filter((r) =>
      (!wrong || r.correct === false) && (!failed || r.status === "failed") &&
      (!label || r.label === label) && (!verdict || r.verdict === verdict) &&
      (!text || [r.id, r.label, r.pred, r.status, r.error, r.note].join("\n").toLowerCase().includes(text)));
    if (state.sort) {
      const key = state.sort, sign = state.desc ? -1 : 1;
      rows = rows.slice().sort((a, b) => {
        const x = a[key], y = b[key];
        if (x == null || x === "") return (y == null || y === "") ? 0 : 1;
        if (y == null || y === "") return -1;
        return (x < y ? -1 : x > y ? 1 : 0) * sign;
      });
    }
    return rows;
  }

  function render() {
    state.shown = filtered();
    sessionStorage.setItem("clamHeatOrder", JSON.stringify(state.shown.map((r) => r.id)));
    const pages = Math.max(1, Math.ceil(state.shown.length / PAGE));
    state.page = Math.min(state.page, pages - 1);
    const body = $("#rows tbody");
    const start = state.page * PAGE;
    const frag = document.createDocumentFragment();
    for (const r of state.shown.slice(start, start + PAGE)) {
      const tr = el("tr", { "data-id": r.id, class: (r.correct === false ? "wrong " : "") + (r.status === "failed" ? "failed" : "") });
      const link = el("a", { href: "/view/" + enc(r.id) }, r.id);
      const thumb = r.maps ? el("img", { loading: "lazy", src: "/thumb/" + enc(r.id) + ".jpg", alt: "" }) : "";
      const cells = {
        thumb, id: link, label: r.label, pred: r.pred, prob: num(r.prob, 3),
        correct: r.correct == null ? "" : r.correct ? "yes" : "no", mean: num(r.mean, 3), std: num(r.std, 3),
        top10: r.top10 == null ? "" : (100 * r.top10).toFixed(1) + " %", status: r.status,
        verdict: r.verdict || "", note: r.note || "", error: r.error || "",
      };
      for (const [key] of COLUMNS) {
        const td = el("td", { class: key }, cells[key]);
        if (key === "error" && r.error) td.title = r.error;
        tr.append(td);
      }
      frag.append(tr);
    }
    body.replaceChildren(frag);
    $("#count").textContent = `${state.shown.length} of ${state.rows.length} slides`;
    $("#page").textContent = `page ${state.page + 1} of ${pages}`;
    for (const th of document.querySelectorAll("#rows th")) {
      th.classList.toggle("sorted-asc", th.dataset.key === state.sort && !state.desc);
      th.classList.toggle("sorted-desc", th.dataset.key === state.sort && state.desc);
    }
  }

  function layout() {
    const labels = [...new Set(state.rows.map((r) => r.label).filter(Boolean))].sort();
    const labelSel = el("select", { id: "f-label" }, el("option", { value: "" }, "any label"));
    for (const l of labels) labelSel.append(el("option", { value: l }, l));
    const verdictSel = el("select", { id: "f-verdict" }, el("option", { value: "" }, "any verdict"));
    for (const v of ["agree", "disagree", "artifact", "unsure"]) verdictSel.append(el("option", { value: v }, v));
    const head = el("tr");
    for (const [key, title] of COLUMNS) {
      const th = el("th", { "data-key": key }, title);
      if (key !== "thumb") th.addEventListener("click", () => {
        state.desc = state.sort === key ? !state.desc : false;
        state.sort = key;
        render();
      });
      head.append(th);
    }
    $("#app").append(
      el("h1", {}, C.title),
      el("div", { id: "filters" },
        el("label", {}, el("input", { type: "checkbox", id: "f-wrong" }), " wrong predictions"),
        el("label", {}, el("input", { type: "checkbox", id: "f-failed" }), " failed rows"),
        labelSel, verdictSel,
        el("input", { type: "search", id: "f-text", placeholder: "search id, label, error, note" }),
        el("span", { id: "count" })),
      el("table", { id: "rows" }, el("thead", {}, head), el("tbody")),
      el("div", { id: "pager" },
        el("button", { id: "page-prev" }, "\u25c0 page"), el("span", { id: "page" }),
        el("button", { id: "page-next" }, "page \u25b6")),
    );
    for (const id of ["#f-wrong", "#f-failed", "#f-label", "#f-verdict"]) {
      $(id).addEventListener("change", () => { state.page = 0; render(); });
    }
    $("#f-text").addEventListener("input", () => { state.page = 0; render(); });
    $("#page-prev").addEventListener("click", () => { state.page = Math.max(0, state.page - 1); render(); });
    $("#page-next").addEventListener("click", () => { state.page += 1; render(); });
  }

  async function load(first) {
    const r = await fetch("/api/cohort");
    const data = await r.json();
    state.rows = data.rows;
    if (first) layout();
    render();
    return data.rows.some((row) => row.maps && row.top10 == null);
  }

  window.clamHeat = {
    state, painted: null, render,
    idle() { return window.clamHeat.painted !== null; },
  };
  (async () => {
    let missing = await load(true);
    window.clamHeat.painted = performance.now();
    for (let k = 0; missing && k < 10; k++) {  // statistics are computed after start
      await new Promise((ok) => setTimeout(ok, 1500));
      missing = await load(false);
    }
  })();
})();
