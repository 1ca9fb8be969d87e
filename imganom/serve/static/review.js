/* The review app (imganom review): a server-paged queue of results (the report's cards from gallery.js)
   and a viewer where the reviewer marks each image defect / normal / skip, optionally with a label, a note
   and a painted mask correction. Keyboard: j/k move, 1/2/3 decide, e edit mask, u undo, c contour, / search. */
(() => {
  "use strict";
  const { el, LABEL, card, details, figure, decisionBadge } = ImganomGallery;
  const PAGE = 50;
  const KEYS = { 1: "defect", 2: "normal", 3: "skip" };
  const $ = (id) => document.getElementById(id);
  const state = { filter: "all", sort: "score", q: "", offset: 0, total: 0, items: [], cursor: -1, item: null, loading: null,
                  editing: false, dirty: false, opacity: 0.5, contour: true, zoom: 1, tx: 0, ty: 0, busy: null };
  const who = $("reviewer");
  who.value = localStorage.getItem("imganom.reviewer") || "";
  who.addEventListener("change", () => localStorage.setItem("imganom.reviewer", who.value.trim()));

  async function api(path, body) {
    const opts = body === undefined ? {} : { method: "POST", headers: { "Content-Type": "application/json" },
                                             body: JSON.stringify(body) };
    const resp = await fetch(path, { credentials: "same-origin", ...opts });
    const data = await resp.json();
    if (!resp.ok) throw new Error((data.error && data.error.message) || resp.statusText);
    return data;
  }
  function flash(msg) { $("status").textContent = msg; }

  function showStats(s) {
    $("agreement").textContent = s.reviewed + " reviewed · agreement " + (s.agreement === null ? "–" :
      Math.round(100 * s.agreement) + "%") + " · false alarms " + s.false_alarms + " · misses " + s.misses;
  }

  async function loadPage(offset, cursor) {
    const qs = new URLSearchParams({ sort: state.sort, filter: state.filter, q: state.q, offset, limit: PAGE });
    const page = await api("api/queue?" + qs);
    Object.assign(state, { offset: page.offset, total: page.total, items: page.items, cursor: -1 });
    const list = $("queue");
    list.replaceChildren(...page.items.map((r, i) => {
      const c = card(r, i);
      c.addEventListener("click", () => select(i));
      return c;
    }));
    const pages = Math.max(1, Math.ceil(page.total / PAGE));
    $("page").textContent = "page " + (Math.floor(page.offset / PAGE) + 1) + " / " + pages + " · " + page.total + " images";
    if (!page.items.length) { state.item = null; $("viewer").replaceChildren(el("p", { class: "empty", text: "No images match." })); }
    else await select(Math.min(Math.max(cursor, 0), page.items.length - 1));
  }
  function reload() { return loadPage(0, 0); }

  function select(i) {  // decisions and undo wait for state.loading, so a key never acts on a stale view
    const prev = $("queue").querySelector(".card.sel");
    if (prev) prev.classList.remove("sel");
    state.cursor = i;
    const c = $("queue").querySelector('.card[data-pos="' + i + '"]');
    c.classList.add("sel");
    c.scrollIntoView({ block: "nearest" });
    state.loading = api("api/item?" + new URLSearchParams({ id: state.items[i].id }))
      .then((item) => { if (state.cursor === i) show(item); });
    return state.loading;
  }
  async function step(d) {
    const i = state.cursor + d;
    if (i >= 0 && i < state.items.length) return select(i);
    if (d > 0 && state.offset + PAGE < state.total) return loadPage(state.offset + PAGE, 0);
    if (d < 0 && state.offset > 0) return loadPage(state.offset - PAGE, PAGE - 1);
  }

  // --- the viewer: stacked original / heatmap / contour / editable mask, with zoom and pan ---
  function show(r) {
    state.item = r;
    state.editing = false;
    state.dirty = false;
    const pos = state.offset + state.cursor + 1;
    const buttons = Object.entries(KEYS).map(([k, d]) => el("button", { type: "button", "data-decision": d,
      class: r.decision && r.decision.decision === d ? "on" : "", text: k + " " + d, onclick: () => decide(d) }));
    const stage = el("div", { class: "stage", id: "stage" });
    const world = el("div", { class: "world", id: "world" });
    stage.append(world);
    const base = r.img.preview || r.img.overlay || r.heatmap;
    const heat = r.heatmap || r.img.overlay;
    const opacity = el("input", { type: "range", id: "opacity", min: "0", max: "1", step: "0.05", value: String(state.opacity) });
    opacity.addEventListener("input", () => { state.opacity = Number(opacity.value); paintLayers(); });
    const contour = el("input", { type: "checkbox", id: "contour", checked: state.contour });
    contour.addEventListener("change", () => { state.contour = contour.checked; paintLayers(); });
    const brush = el("input", { type: "range", id: "brush", min: "1", max: "40", value: "6" });
    $("viewer").replaceChildren(
      el("header", {}, el("span", { class: "badge " + r.cat, text: LABEL[r.cat] }), el("span", { class: "cid", text: r.id }),
         decisionBadge(r.decision), el("span", { class: "status", text: pos + " / " + state.total })),
      el("div", { class: "decide" }, ...buttons,
         el("input", { id: "label", placeholder: "defect type", value: (r.decision && r.decision.label) || "", size: "14" }),
         el("input", { id: "note", placeholder: "note", value: (r.decision && r.decision.note) || "", size: "24" }),
         el("button", { type: "button", id: "undo", text: "u undo", onclick: undo }),
         el("button", { type: "button", id: "edit-mask", text: "e edit mask", onclick: toggleEdit })),
      el("div", { class: "layers" }, el("label", {}, "heatmap ", opacity), el("label", {}, contour, " contour"),
         el("label", {}, "brush ", brush), el("span", { text: "paint: drag · erase: shift+drag · wheel zoom, drag pan" }),
         el("button", { type: "button", text: "fit", onclick: () => fit() })),
      el("div", { class: "side" }, stage,
         el("div", {}, figure(r.img.mask, "mask", "mask of " + r.id), ...details(r),
            el("ol", { class: "history" }, ...(r.history || []).map((h) => el("li", {
              text: h.time + " " + (h.reviewer || "?") + ": " + h.decision + (h.label ? " (" + h.label + ")" : "") }))))));
    if (!base) return;
    const img = el("img", { class: "base", src: base, alt: r.id });
    const heatImg = heat ? el("img", { class: "heat", src: heat, alt: "heatmap of " + r.id }) : null;
    const lines = el("canvas", { class: "contour" }), edit = el("canvas", { class: "edit", id: "edit" });
    world.append(img, ...(heatImg ? [heatImg] : []), lines, edit);
    img.addEventListener("load", () => {
      world.style.width = img.naturalWidth + "px";
      world.style.height = img.naturalHeight + "px";
      fit();
      loadMask(r, img, lines, edit);
    });
    bindStage(stage, edit, brush);
    paintLayers();
  }
  function paintLayers() {
    const h = document.querySelector(".world .heat"), c = document.querySelector(".world .contour");
    if (h) h.style.opacity = String(state.opacity);
    if (c) c.style.display = state.contour ? "" : "none";
  }
  function loadMask(r, img, lines, edit) {
    const mask = new Image();
    const draw = () => {
      const w = mask.naturalWidth || img.naturalWidth, h = mask.naturalHeight || img.naturalHeight;
      for (const cv of [lines, edit]) { cv.width = w; cv.height = h; }
      if (!mask.naturalWidth) return;
      const tmp = el("canvas", { width: w, height: h }), tc = tmp.getContext("2d");
      tc.drawImage(mask, 0, 0);
      const src = tc.getImageData(0, 0, w, h).data;
      const on = (x, y) => x >= 0 && y >= 0 && x < w && y < h && src[4 * (y * w + x)] > 127;
      const lc = lines.getContext("2d"), ec = edit.getContext("2d");
      const out = lc.createImageData(w, h), fill = ec.createImageData(w, h);
      for (let y = 0; y < h; y++) for (let x = 0; x < w; x++) {
        if (!on(x, y)) continue;
        const k = 4 * (y * w + x);
        fill.data.set([229, 72, 77, 255], k);
        if (!on(x - 1, y) || !on(x + 1, y) || !on(x, y - 1) || !on(x, y + 1)) out.data.set([255, 209, 102, 255], k);
      }
      lc.putImageData(out, 0, 0);
      ec.putImageData(fill, 0, 0);
    };
    mask.addEventListener("load", draw);
    mask.addEventListener("error", draw);
    if (r.img.mask) mask.src = r.img.mask; else draw();
    edit.style.display = "none";
  }
  function fit() {
    const stage = $("stage"), world = $("world");
    if (!stage || !world) return;
    const w = parseFloat(world.style.width) || 1, h = parseFloat(world.style.height) || 1;
    state.zoom = Math.min(stage.clientWidth / w, stage.clientHeight / h);
    state.tx = (stage.clientWidth - w * state.zoom) / 2;
    state.ty = (stage.clientHeight - h * state.zoom) / 2;
    place();
  }
  function place() {
    const world = $("world");
    if (world) world.style.transform = "translate(" + state.tx + "px," + state.ty + "px) scale(" + state.zoom + ")";
  }
  function bindStage(stage, edit, brush) {
    let drag = null;
    stage.addEventListener("wheel", (e) => {
      e.preventDefault();
      const b = stage.getBoundingClientRect(), mx = e.clientX - b.left, my = e.clientY - b.top;
      const f = Math.exp(-e.deltaY / 500), z = Math.min(64, Math.max(0.05, state.zoom * f));
      state.tx = mx - (mx - state.tx) * (z / state.zoom);
      state.ty = my - (my - state.ty) * (z / state.zoom);
      state.zoom = z;
      place();
    }, { passive: false });
    const paint = (e) => {  // a round-capped line from the last point, brush radius in screen pixels
      const b = edit.getBoundingClientRect();
      const x = (e.clientX - b.left) * edit.width / b.width, y = (e.clientY - b.top) * edit.height / b.height;
      const from = drag.last || [x, y];
      const ctx = edit.getContext("2d");
      ctx.globalCompositeOperation = e.shiftKey ? "destination-out" : "source-over";
      ctx.strokeStyle = "rgb(229, 72, 77)";
      ctx.lineCap = "round";
      ctx.lineWidth = 2 * Number(brush.value) * edit.width / Math.max(b.width, 1);
      ctx.beginPath();
      ctx.moveTo(from[0], from[1]);
      ctx.lineTo(x + 0.01, y);
      ctx.stroke();
      drag.last = [x, y];
      state.dirty = true;
    };
    stage.addEventListener("pointerdown", (e) => {
      stage.setPointerCapture(e.pointerId);
      drag = { x: e.clientX, y: e.clientY, tx: state.tx, ty: state.ty };
      if (state.editing) paint(e);
    });
    stage.addEventListener("pointermove", (e) => {
      if (!drag) return;
      if (state.editing) { paint(e); return; }
      state.tx = drag.tx + e.clientX - drag.x;
      state.ty = drag.ty + e.clientY - drag.y;
      place();
    });
    const end = () => { drag = null; };
    stage.addEventListener("pointerup", end);
    stage.addEventListener("pointercancel", end);
  }
  function toggleEdit() {
    const edit = $("edit");
    if (!edit) return;
    state.editing = !state.editing;
    edit.style.display = state.editing || state.dirty ? "" : "none";
    $("stage").classList.toggle("editing", state.editing);
    $("edit-mask").classList.toggle("on", state.editing);
  }
  function maskPng() {  // the painted layer as a black/white PNG at mask resolution
    const edit = $("edit");
    const out = el("canvas", { width: edit.width, height: edit.height }), oc = out.getContext("2d");
    const src = edit.getContext("2d").getImageData(0, 0, edit.width, edit.height).data;
    const img = oc.createImageData(edit.width, edit.height);
    for (let k = 0; k < src.length; k += 4) {
      const v = src[k + 3] > 0 ? 255 : 0;
      img.data[k] = img.data[k + 1] = img.data[k + 2] = v;
      img.data[k + 3] = 255;
    }
    oc.putImageData(img, 0, 0);
    return out.toDataURL("image/png");
  }

  // --- decisions ---
  async function send(body) {
    const r = state.item, i = state.cursor;
    const res = await api("api/decisions", { id: r.id, reviewer: who.value.trim() || null, ...body });
    state.items[i].decision = res.decision;
    const c = $("queue").querySelector('.card[data-pos="' + i + '"] header');
    const old = c.querySelector(".decision");
    if (old) old.remove();
    const badge = decisionBadge(res.decision);
    if (badge) c.append(badge);
    showStats(res.reviews);
    return res;
  }
  async function decide(d) {
    await state.loading;
    if (!state.item || state.busy) return;
    const body = { decision: d, label: $("label").value.trim() || null, note: $("note").value.trim() || null };
    if (state.dirty) body.mask = maskPng();
    state.busy = d;
    try {
      await send(body);
      flash("saved: " + state.item.id + " → " + d);
      await step(1);
    } catch (e) { flash("not saved: " + e.message); } finally { state.busy = null; }
  }
  async function undo() {
    await state.loading;
    if (!state.item || state.busy) return;
    try {
      await send({ decision: "undo" });
      flash("undone: " + state.item.id);
      await select(state.cursor);
    } catch (e) { flash("undo failed: " + e.message); }
  }

  // --- toolbar and keys ---
  document.querySelector(".filters").addEventListener("click", (e) => {
    const b = e.target.closest("button");
    if (!b) return;
    state.filter = b.dataset.filter;
    for (const x of document.querySelectorAll(".filters button")) x.setAttribute("aria-pressed", String(x === b));
    reload();
  });
  $("sort").addEventListener("change", () => { state.sort = $("sort").value; reload(); });
  let timer = null;
  $("search").addEventListener("input", () => {
    clearTimeout(timer);
    timer = setTimeout(() => { state.q = $("search").value.trim(); reload(); }, 150);
  });
  $("prev-page").addEventListener("click", () => { if (state.offset > 0) loadPage(state.offset - PAGE, 0); });
  $("next-page").addEventListener("click", () => { if (state.offset + PAGE < state.total) loadPage(state.offset + PAGE, 0); });
  document.addEventListener("keydown", (e) => {
    if (e.ctrlKey || e.metaKey || e.altKey) return;
    const t = e.target;
    if (t instanceof HTMLInputElement || t instanceof HTMLSelectElement || t instanceof HTMLTextAreaElement) {
      if (e.key === "Escape" || (e.key === "Enter" && t.type !== "range")) { t.blur(); e.preventDefault(); }
      return;
    }
    const moves = { j: 1, k: -1, ArrowDown: 1, ArrowUp: -1 };
    if (e.key in moves) step(moves[e.key]);
    else if (e.key in KEYS) decide(KEYS[e.key]);
    else if (e.key === "e") toggleEdit();
    else if (e.key === "u") undo();
    else if (e.key === "c") { state.contour = !state.contour; const c = $("contour"); if (c) c.checked = state.contour; paintLayers(); }
    else if (e.key === "/") $("search").focus();
    else return;
    e.preventDefault();
  });

  api("api/info").then((info) => {
    if (!who.value && info.reviewer) who.value = info.reviewer;
    document.title = "imganom review · " + info.results_dir;
    showStats(info.reviews);
    return reload();
  }).catch((e) => flash("cannot load: " + e.message));
  window.imganomReview = { state, decide, step };  // for scripted checks (tests, the console)
})();
