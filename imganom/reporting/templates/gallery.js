/* Gallery pieces shared by report.html (inlined) and the review app (served as /static/gallery.js):
   DOM helper, number format, the card of one result and the region table. Rows are reporting.html's
   card data: {id, cat, verdict, score, norm, nreg, maxarea, error, img: {preview, overlay, mask}, regions}
   (+ review, conf, expl when uncertainty/explanations were asked for). */
const ImganomGallery = (() => {
  "use strict";
  function el(tag, props, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(props || {})) {
      if (k === "class") node.className = v;
      else if (k === "text") node.textContent = v;
      else if (k in node && typeof v !== "string") node[k] = v;
      else node.setAttribute(k, v);
    }
    for (const c of children) if (c != null) node.append(c);
    return node;
  }
  function fmt(v, digits = 4) {
    if (v === null || v === undefined || !Number.isFinite(Number(v))) return "–";
    return String(Number(Number(v).toPrecision(digits)));
  }
  const LABEL = { ng: "NG", ok: "OK", error: "ERROR" };

  function figure(src, caption, alt) {
    const media = src ? el("img", { src, alt, loading: "lazy", decoding: "async" })
                      : el("div", { class: "missing", text: "no " + caption });
    return el("figure", {}, media, el("figcaption", { text: caption }));
  }
  function stat(label, value) { return el("div", {}, el("span", { text: label + " " }), value); }

  // A reviewer's decision (reviews.jsonl record: decision, label) as a badge; null without one.
  function decisionBadge(d) {
    return d ? el("span", { class: "decision " + d.decision, text: d.decision + (d.label ? ": " + d.label : ""),
                            title: d.reviewer ? "reviewed by " + d.reviewer : "reviewed" }) : null;
  }
  // One result as a card (badge, id, three thumbnails, score line, error); the caller adds listeners.
  function card(r, pos) {
    const c = el("article", { class: "card cat-" + r.cat, "data-pos": String(pos), "data-id": r.id,
                              "data-cat": r.cat, "data-score": r.score === null ? "" : String(r.score) },
      el("header", {}, el("span", { class: "badge " + r.cat, text: LABEL[r.cat] }),
         r.review ? el("span", { class: "badge review", text: "REVIEW", title: "low confidence near the threshold" }) : null,
         el("span", { class: "cid", text: r.id, title: r.id }), decisionBadge(r.decision)));
    if (r.cat !== "error" || r.img.preview || r.img.overlay) {
      c.append(el("div", { class: "thumbs" }, figure(r.img.preview, "original", r.id),
                  figure(r.img.overlay, "overlay", "overlay of " + r.id), figure(r.img.mask, "mask", "mask of " + r.id)));
    }
    if (r.cat !== "error") {
      c.append(el("div", { class: "stats" }, stat("score", fmt(r.score)), stat("norm", fmt(r.norm, 3)),
                  stat("regions", fmt(r.nreg, 9)), stat("largest", r.maxarea ? fmt(r.maxarea, 9) + " px" : "–"),
                  r.conf !== null && r.conf !== undefined ? stat("confidence", fmt(r.conf, 3)) : null));
    }
    if (r.error) c.append(el("div", { class: "errmsg", text: r.error }));
    return c;
  }
  // Score line and region table of one result, for the enlarged view.
  function details(r) {
    const out = [];
    if (r.cat !== "error") {
      out.push(el("div", { class: "stats" }, stat("score", fmt(r.score, 6)), stat("normalised", fmt(r.norm, 4)),
                  stat("regions", fmt(r.nreg, 9)), stat("largest", r.maxarea ? fmt(r.maxarea, 9) + " px" : "–")));
    }
    if (r.error) out.push(el("div", { class: "errmsg", text: r.error }));
    if (r.regions && r.regions.length) {
      const cols = ["id", "bbox", "area", "area_pct", "centroid", "peak", "mean"];
      if (r.regions[0].confidence !== undefined) cols.push("confidence");
      const cell = (v) => el("td", { text: Array.isArray(v) ? v.map((x) => fmt(x, 5)).join(", ") : fmt(v, 4) });
      out.push(el("table", { class: "regions" }, el("thead", {}, el("tr", {}, ...cols.map((k) => el("th", { text: k })))),
                  el("tbody", {}, ...r.regions.map((g) => el("tr", {}, ...cols.map((k) => cell(g[k])))))));
    }
    return out;
  }
  return { el, fmt, LABEL, figure, stat, card, details, decisionBadge };
})();
