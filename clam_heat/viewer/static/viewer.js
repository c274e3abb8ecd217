// clam-heat slide page: the slide and its maps as OpenSeadragon tiled images served by
// clam-heat's viewer, synced panes or one overlay pane, live controls, hover, patch, review.
"use strict";
(function () {
  const C = window.CLAM_HEAT;
  const enc = encodeURIComponent;
  const $ = (sel) => document.querySelector(sel);
  const el = (tag, attrs = {}, ...kids) => {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs)) {
      if (k === "class") e.className = v;
      else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
      else e.setAttribute(k, v);
    }
    for (const k of kids) e.append(k);
    return e;
  };
  const state = { map: 0, overlay: false, style: {}, opacity: {}, pending: 0, hover: null };
  let info = null;
  const viewers = [];

  // ---------------------------------------------------------------- neighbours
  function order() {
    try {
      const saved = JSON.parse(sessionStorage.getItem("clamHeatOrder") || "null");
      if (Array.isArray(saved) && saved.includes(C.slide_id)) return saved;
    } catch (e) { /* no stored order */ }
    return null;
  }
  function go(step) {
    const ids = order();
    let target = null;
    if (ids) {
      const k = ids.indexOf(C.slide_id) + step;
      if (k >= 0 && k < ids.length) target = ids[k];
    } else {
      target = step > 0 ? info.next : info.prev;
    }
    if (target != null) location.href = "/view/" + enc(target);
  }

  // ---------------------------------------------------------------- tile sources
  function styleQuery() {
    const s = state.style;
    return new URLSearchParams({
      cmap: s.cmap, th: String(s.threshold), blur: s.blur ? "1" : "0",
      scale: s.scale, bin: s.binarize ? "1" : "0", seg: s.segment ? "1" : "0",
    }).toString();
  }
  function source(width, height, url) {
    return { width, height, tileSize: info.tile, tileOverlap: 0, minLevel: 0, getTileUrl: url };
  }
  const slideSource = () => source(info.width, info.height,
    (l, x, y) => `/tiles/${enc(C.slide_id)}/slide/${l}/${x}_${y}.jpg`);
  function mapSource(no) {
    if (no === "image") {
      return source(info.image.width, info.image.height,
        (l, x, y) => `/tiles/${enc(C.slide_id)}/image/${l}/${x}_${y}.png`);
    }
    const q = styleQuery();
    return source(info.width, info.height,
      (l, x, y) => `/tiles/${enc(C.slide_id)}/map/${no}/${l}/${x}_${y}.png?${q}`);
  }

  function addImage(viewer, tileSource, opacity, tag, replace) {
    state.pending += 1;
    viewer.addTiledImage({
      tileSource, x: 0, width: 1, opacity,
      success: (ev) => {
        ev.item.clamTag = tag;
        if (replace) viewer.world.removeItem(replace);
        state.pending -= 1;
      },
      error: () => { state.pending -= 1; },
    });
  }
  const items = (viewer) => {
    const out = [];
    for (let i = 0; i < viewer.world.getItemCount(); i++) out.push(viewer.world.getItemAt(i));
    return out;
  };
  const mapNos = () => (info.image ? ["image"] : info.maps.map((m) => m.no));

  // ---------------------------------------------------------------- viewers
  function makeViewer(pane) {
    const v = OpenSeadragon({
      element: pane, prefixUrl: "/static/openseadragon/images/", showNavigator: true, drawer: "canvas",
      navigatorPosition: "BOTTOM_RIGHT", imageSmoothingEnabled: false,
      maxZoomPixelRatio: 8, animationTime: 0.4, crossOriginPolicy: false,
      gestureSettingsMouse: { clickToZoom: false }, showRotationControl: false,
    });
    v.addHandler("viewport-change", () => { sync(v); scaleBar(v); });
    v.addHandler("canvas-click", (ev) => { if (ev.quick) openPatch(v, ev.position); });
    pane.addEventListener("mousemove", (ev) => {
      const r = pane.getBoundingClientRect();
      const at = new OpenSeadragon.Point(ev.clientX - r.left, ev.clientY - r.top);
      hover(v, at);
      cross(v, at);
    });
    pane.addEventListener("mouseleave", () => cross(v, null));
    viewers.push(v);
    return v;
  }
  // the cursor, mirrored as a cross at the same level-0 point in the other pane
  function cross(src, at) {
    for (const v of viewers) {
      let mark = v.element.querySelector(".cross");
      if (!mark) { mark = el("div", { class: "cross" }); v.element.append(mark); }
      const show = at && v !== src && v.isVisible();
      mark.hidden = !show;
      if (show) {
        const p = v.viewport.pixelFromPoint(src.viewport.pointFromPixel(at, true), true);
        mark.style.left = p.x + "px";
        mark.style.top = p.y + "px";
      }
    }
  }
  let syncing = false;
  function sync(src) {
    if (syncing) return;
    syncing = true;
    for (const v of viewers) {
      if (v === src || !v.isVisible()) continue;
      v.viewport.zoomTo(src.viewport.getZoom(), null, true);
      v.viewport.panTo(src.viewport.getCenter(), true);
    }
    syncing = false;
  }

  function buildPanes() {
    const slidePane = $("#pane-slide"), mapPane = $("#pane-map");
    const a = makeViewer(slidePane), b = makeViewer(mapPane);
    addImage(a, slideSource(), 1, "slide");
    addImage(b, slideSource(), 1, "slide");
    for (const no of mapNos()) {
      const shown = no === state.map || no === "image";
      state.opacity[no] = shown ? state.style.alpha : 0;
      addImage(b, mapSource(no), state.opacity[no], "map:" + no);
    }
  }
  function redrawMaps() {
    const b = viewers[1];
    for (const item of items(b)) {
      const tag = item.clamTag || "";
      if (!tag.startsWith("map:") || tag === "map:image") continue;
      const no = Number(tag.slice(4));
      addImage(b, mapSource(no), state.opacity[no], tag, item);
    }
    legend();
  }
  function applyOpacity() {
    for (const item of items(viewers[1])) {
      const tag = item.clamTag || "";
      if (tag.startsWith("map:")) {
        const no = tag.slice(4) === "image" ? "image" : Number(tag.slice(4));
        item.setOpacity(state.opacity[no]);
      }
    }
  }
  function setMode(overlay) {
    state.overlay = overlay;
    document.body.classList.toggle("overlay", overlay);
    $("#opacities").hidden = !overlay;
    $("#alpha-box").hidden = overlay;
    if (!overlay) {
      for (const no of mapNos()) state.opacity[no] = (no === state.map || no === "image") ? state.style.alpha : 0;
    }
    applyOpacity();
    syncOpacitySliders();
    setTimeout(() => { for (const v of viewers) v.forceResize && v.forceResize(); sync(viewers[1]); }, 0);
  }

  // ---------------------------------------------------------------- scale bar
  function scaleBar(v) {
    const bar = v.element.querySelector(".scalebar");
    const item = v.world.getItemAt(0);
    if (!bar || !item || !info.mpp) return;
    const zoom = item.viewportToImageZoom(v.viewport.getZoom(true)); // screen px per l0 px
    const umPerPx = info.mpp / zoom;
    const target = 120 * umPerPx;
    const p = Math.pow(10, Math.floor(Math.log10(target)));
    const nice = [5, 2, 1].map((m) => m * p).find((m) => m <= target) || p;
    bar.style.width = (nice / umPerPx).toFixed(0) + "px";
    bar.textContent = nice >= 1000 ? nice / 1000 + " mm" : nice + " \u00b5m";
  }

  // ---------------------------------------------------------------- colour bar
  async function legend() {
    const box = $("#legend");
    const s = state.style;
    const cmap = info.image ? info.image.cmap : s.cmap;
    const q = new URLSearchParams({ cmap, scale: info.image ? (info.image.scale || "percentile") : s.scale });
    if (!info.image) { q.set("slide", C.slide_id); q.set("map", String(state.map)); }
    const r = await fetch("/api/legend?" + q);
    if (!r.ok) return;
    const bar = await r.json();
    if (info.image && info.image.low != null) { bar.low = info.image.low; bar.high = info.image.high; }
    const canvas = $("#legend-bar");
    const ctx = canvas.getContext("2d");
    const n = bar.colors.length;
    const hidden = info.image ? 0 : s.threshold;
    for (let i = 0; i < canvas.width; i++) {
      const f = i / canvas.width;
      ctx.fillStyle = f < hidden ? "#d8d8d8" : bar.colors[Math.min(n - 1, Math.floor(f * n))];
      ctx.fillRect(i, 0, 1, canvas.height);
    }
    canvas.dataset.cmap = cmap;
    $("#legend-low").textContent = fmt(bar.low);
    $("#legend-high").textContent = fmt(bar.high);
    $("#legend-title").textContent = `${bar.title} \u00b7 ${cmap}` + (hidden ? ` \u00b7 below ${hidden} hidden` : "");
  }
  const fmt = (x) => (typeof x === "number" ? (Math.abs(x) >= 100 || x === 0 ? x.toFixed(0) : x.toPrecision(3)) : x);

  // ---------------------------------------------------------------- hover and patch
  let hoverTimer = null;
  function l0At(v, position) {
    const item = v.world.getItemAt(0);
    if (!item) return null;
    const p = item.viewerElementToImageCoordinates(position);
    return { x: p.x, y: p.y };
  }
  function hover(v, position) {
    if (!info.maps.length) return;
    const p = l0At(v, position);
    if (!p) return;
    clearTimeout(hoverTimer);
    hoverTimer = setTimeout(() => showHover(p), 60);
  }
  async function showHover(p) {
    const q = new URLSearchParams({ map: String(state.map), x: p.x.toFixed(1), y: p.y.toFixed(1), scale: state.style.scale });
    const r = await fetch(`/api/patch/${enc(C.slide_id)}?${q}`);
    const found = r.ok ? await r.json() : null;
    state.hover = found;
    $("#hover").textContent = found
      ? `score ${found.score.toPrecision(4)} \u00b7 percentile ${found.percentile.toFixed(1)} \u00b7 rank ${found.rank} of ${found.n} \u00b7 patch (${found.x}, ${found.y}) ${found.w}\u00d7${found.h}`
      : `(${Math.round(p.x)}, ${Math.round(p.y)}): no patch`;
  }
  async function openPatch(v, position) {
    if (!info.maps.length) return;
    const p = l0At(v, position);
    const q = new URLSearchParams({ map: String(state.map), x: p.x.toFixed(1), y: p.y.toFixed(1), scale: state.style.scale });
    const r = await fetch(`/api/patch/${enc(C.slide_id)}?${q}`);
    const found = r.ok ? await r.json() : null;
    const box = $("#patch");
    box.replaceChildren();
    if (!found) return;
    const url = `/patch/${enc(C.slide_id)}/${state.map}/${found.x}_${found.y}.jpg`;
    box.append(
      el("img", { src: url, alt: "patch", id: "patch-image" }),
      el("div", {}, `(${found.x}, ${found.y}) \u00b7 score ${found.score.toPrecision(4)} \u00b7 rank ${found.rank}`),
      el("a", { href: url, download: `${C.slide_id}_${found.x}_${found.y}.jpg`, id: "patch-save" }, "save patch"),
    );
  }

  // ---------------------------------------------------------------- review
  function reviewForm() {
    const form = $("#review");
    if (!info.reviewable) { form.hidden = true; return; }
    const saved = info.review || {};
    $("#verdict").value = saved.verdict || "";
    $("#note").value = saved.note || "";
    $("#review-status").textContent = saved.updated_at ? "saved " + saved.updated_at : "";
    form.addEventListener("submit", async (ev) => {
      ev.preventDefault();
      const body = JSON.stringify({ verdict: $("#verdict").value, note: $("#note").value });
      const r = await fetch(`/api/review/${enc(C.slide_id)}`, { method: "POST", body, headers: { "Content-Type": "application/json" } });
      const text = await r.text();
      $("#review-status").textContent = r.ok ? "saved " + JSON.parse(text).updated_at : "not saved: " + text;
    });
  }

  // ---------------------------------------------------------------- controls
  function controls() {
    const s = state.style;
    const bar = $("#controls");
    const mapSel = el("select", { id: "map" });
    if (info.image) mapSel.append(el("option", { value: "image" }, "heatmap image"));
    for (const m of info.maps) mapSel.append(el("option", { value: String(m.no) }, m.name));
    const cmapSel = el("select", { id: "cmap" });
    for (const name of C.cmaps) cmapSel.append(el("option", { value: name }, name));
    cmapSel.value = s.cmap;
    const scaleSel = el("select", { id: "scale" });
    for (const name of ["percentile", "raw", "cohort"]) {
      const opt = el("option", { value: name }, name);
      if (name === "cohort" && !info.cohort_scale) opt.disabled = true;
      scaleSel.append(opt);
    }
    scaleSel.value = s.scale;
    const alpha = el("input", { id: "alpha", type: "range", min: "0", max: "1", step: "0.05" });
    alpha.value = s.alpha;
    const th = el("input", { id: "threshold", type: "range", min: "0", max: "1", step: "0.01" });
    th.value = s.threshold;
    const blur = el("input", { id: "blur", type: "checkbox" });
    blur.checked = s.blur;
    const overlay = el("input", { id: "overlay", type: "checkbox" });
    const live = info.image ? [] : [cmapSel, scaleSel, th, blur];
    for (const c of live) c.addEventListener("change", () => {
      s.cmap = cmapSel.value; s.scale = scaleSel.value; s.threshold = Number(th.value); s.blur = blur.checked;
      redrawMaps();
    });
    if (info.image) for (const c of [cmapSel, scaleSel, th, blur]) c.disabled = true;
    mapSel.addEventListener("change", () => {
      state.map = mapSel.value === "image" ? "image" : Number(mapSel.value);
      const m = info.maps[state.map];
      if (m && m.cmap) { s.cmap = m.cmap; cmapSel.value = m.cmap; }
      if (m && m.scale) { s.scale = m.scale; scaleSel.value = m.scale; }
      if (m && (m.cmap || m.scale)) redrawMaps();
      if (!state.overlay) setMode(false);
      legend();
    });
    alpha.addEventListener("input", () => { s.alpha = Number(alpha.value); setMode(state.overlay); });
    overlay.addEventListener("change", () => setMode(overlay.checked));
    const opac = el("div", { id: "opacities", hidden: "" });
    for (const no of mapNos()) {
      const name = no === "image" ? "heatmap image" : info.maps[no].name;
      const slider = el("input", { type: "range", min: "0", max: "1", step: "0.05", "data-map": String(no) });
      slider.addEventListener("input", () => { state.opacity[no] = Number(slider.value); applyOpacity(); });
      opac.append(el("label", {}, name + " ", slider));
    }
    bar.append(
      el("label", {}, "map ", mapSel), el("label", {}, "colormap ", cmapSel),
      el("label", { id: "alpha-box" }, "alpha ", alpha), el("label", {}, "threshold ", th),
      el("label", {}, blur, " blur"), el("label", {}, "scale ", scaleSel),
      el("label", {}, overlay, " overlay"), opac,
    );
  }
  function syncOpacitySliders() {
    for (const s of document.querySelectorAll("#opacities input")) {
      const no = s.dataset.map === "image" ? "image" : Number(s.dataset.map);
      s.value = state.opacity[no];
    }
  }

  function layout() {
    const d = info.details || {};
    const pred = d.Pred_0 ? ` \u00b7 predicted ${d.Pred_0}` + (d.p_0 ? ` (${Number(d.p_0).toFixed(3)})` : "") : "";
    $("#app").append(
      el("header", { id: "bar" },
        el("a", { href: "/", id: "home" }, "\u2190 cohort"),
        el("button", { id: "prev", title: "previous (p)", onclick: () => go(-1) }, "\u25c0"),
        el("strong", { id: "name" }, C.slide_id),
        el("button", { id: "next", title: "next (n)", onclick: () => go(1) }, "\u25b6"),
        el("span", { id: "meta" }, `${info.label ? "label " + info.label : ""}${pred} \u00b7 ${info.status}`),
        el("span", { id: "error" }, info.error || "")),
      el("div", { id: "controls" }),
      el("div", { id: "legend" }, el("span", { id: "legend-low" }), el("canvas", { id: "legend-bar", width: "256", height: "14" }),
        el("span", { id: "legend-high" }), el("span", { id: "legend-title" })),
      el("main", { id: "panes" },
        el("div", { class: "pane", id: "pane-slide" }, el("div", { class: "scalebar" })),
        el("div", { class: "pane", id: "pane-map" }, el("div", { class: "scalebar" })),
        el("aside", { id: "side" },
          el("div", { id: "hover" }, "hover a patch for its score; click it to open it"),
          el("div", { id: "patch" }),
          el("form", { id: "review" },
            el("label", {}, "verdict ", (() => {
              const v = el("select", { id: "verdict" });
              for (const x of ["", "agree", "disagree", "artifact", "unsure"]) v.append(el("option", { value: x }, x || "\u2014"));
              return v;
            })()),
            el("textarea", { id: "note", rows: "4", maxlength: "4000", placeholder: "note" }),
            el("button", { type: "submit", id: "save" }, "save"),
            el("span", { id: "review-status" })))),
    );
  }

  document.addEventListener("keydown", (ev) => {
    if (ev.target.closest && ev.target.closest("textarea, input, select")) return;
    if (ev.key === "n") go(1);
    else if (ev.key === "p") go(-1);
  });

  async function main() {
    const r = await fetch("/api/slide/" + enc(C.slide_id));
    info = await r.json();
    state.style = Object.assign({}, info.style);
    state.map = info.image ? "image" : 0;
    layout();
    if (info.width == null) { $("#panes").hidden = true; return; }
    controls();
    buildPanes();
    setMode(false);
    legend();
    reviewForm();
  }

  window.clamHeat = {
    state, viewers,
    get info() { return info; },
    idle() {
      if (!info) return false;
      if (info.width == null) return true;
      if (state.pending > 0 || !viewers.length) return false;
      // an item at opacity 0 is not drawn, so OpenSeadragon never loads its tiles
      return viewers.every((v) => !v.isVisible() || items(v).every((it) => it.getOpacity() === 0 || it.getFullyLoaded()));
    },
    view() {
      const v = viewers[1];
      const c = v.viewport.getCenter(true);
      const item = v.world.getItemAt(0);
      const p = item.viewportToImageCoordinates(c);
      return { x: p.x, y: p.y, ds: 1 / item.viewportToImageZoom(v.viewport.getZoom(true)) };
    },
    setView(x, y, ds, which = 1) {
      const v = viewers[which];
      const item = v.world.getItemAt(0);
      const zoom = item.imageToViewportZoom(1 / ds);
      v.viewport.zoomTo(zoom, null, true);
      v.viewport.panTo(item.imageToViewportCoordinates(x, y), true);
    },
    hoverAt(x, y) { return showHover({ x, y }); },
    toScreen(x, y, which = 1) {  // page pixels of level-0 (x, y) in a pane
      const v = viewers[which];
      const p = v.world.getItemAt(0).imageToViewerElementCoordinates(new OpenSeadragon.Point(x, y));
      const r = v.element.getBoundingClientRect();
      return [r.left + p.x, r.top + p.y];
    },
  };
  main();
})();
