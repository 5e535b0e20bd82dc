"""The review page's style sheet and its one inline script (no source file, no request, no handler attribute).

The script does three things, each also reachable from the page's address so that a link (or a
test) can open a state directly:

* the lightbox: a click on a pictured image (or ``report.html#card-12``) shows it enlarged to the
  window with its caption; Esc or a click outside closes it, the arrow keys step through the
  pictures;
* the full list: the controls sort it and filter it (``#list?sort=eta-asc&status=rejected&class=bottle``;
  every change writes the state back into the address);
* the "copy these paths" buttons: the box's text to the clipboard.
"""

from __future__ import annotations

__all__ = ["REVIEW_CSS", "REVIEW_SCRIPT"]

REVIEW_CSS = """
.classes td a{font-weight:600}.note{color:#666;font-size:13px}
.gallery{grid-template-columns:repeat(auto-fill,minmax(440px,1fr))}
.card.borderline{border-color:#f0ad4e}.card.nopic{padding:8px}.card.corrected{box-shadow:0 0 0 2px #0275d8}
.card img.zoom{cursor:zoom-in}
.badge.contaminant{background:#8e44ad}.badge.normal{background:#6c757d}.badge.unknown{background:#bbb}
.badge.decision{background:#0275d8}
.path{font-family:ui-monospace,monospace;font-size:12px}a.open{font-size:12px;margin-left:4px}
table.classes,table.scores{display:block;overflow-x:auto;max-width:100%}svg.histogram{max-width:100%;height:auto}
td.thumb{padding:2px}td.thumb img{height:64px;width:auto;max-width:128px;display:block}
.controls{display:flex;flex-wrap:wrap;gap:14px;align-items:center;margin:8px 0}
.copy textarea{width:100%;box-sizing:border-box;font:12px ui-monospace,monospace}.copy button{margin:4px 0 12px}
.lightbox{position:fixed;inset:0;z-index:10;background:rgba(12,12,12,.97);display:flex;flex-direction:column;
align-items:center;justify-content:center;padding:12px}.lightbox[hidden]{display:none}
.lightbox img{display:block;background:#111;cursor:zoom-out}
.lightbox .caption{color:#eee;max-width:96vw;margin-top:8px}.lightbox .caption figcaption{color:#eee}
.lightbox a{color:#9cf}.lightbox .close{position:absolute;top:6px;right:14px;font-size:30px;line-height:1;
background:none;border:0;color:#fff;cursor:pointer}
"""

REVIEW_SCRIPT = r"""
(function () {
  "use strict";
  var doc = document;

  /* ---- lightbox ---- */
  var pictures = Array.prototype.slice.call(doc.querySelectorAll("figure.card img.zoom"));
  var box = doc.createElement("div"), big = doc.createElement("img"), text = doc.createElement("div");
  var shut = doc.createElement("button"), current = -1;
  box.id = "lightbox"; box.className = "lightbox"; box.hidden = true; box.setAttribute("role", "dialog");
  text.className = "caption"; shut.type = "button"; shut.className = "close"; shut.textContent = "\u00d7";
  shut.title = "close (Esc)"; big.alt = "";
  box.appendChild(shut); box.appendChild(big); box.appendChild(text); doc.body.appendChild(box);

  function fit() {
    var scale = Math.min(4, window.innerWidth * 0.96 / big.naturalWidth, window.innerHeight * 0.84 / big.naturalHeight);
    if (isFinite(scale) && scale > 0) { big.style.width = Math.round(big.naturalWidth * scale) + "px"; }
  }
  function show(index) {
    if (index < 0 || index >= pictures.length) { return; }
    var picture = pictures[index], caption = picture.parentNode.querySelector("figcaption");
    current = index; big.onload = fit; big.src = picture.src; big.alt = picture.alt;
    box.setAttribute("data-card", picture.parentNode.id);
    text.textContent = "";
    if (caption) { text.appendChild(caption.cloneNode(true)); }
    box.hidden = false;
    if (big.complete) { fit(); }
    shut.focus();
  }
  function hide() { box.hidden = true; current = -1; box.removeAttribute("data-card"); }
  pictures.forEach(function (picture, index) {
    picture.tabIndex = 0;
    picture.addEventListener("click", function () { show(index); });
    picture.addEventListener("keydown", function (e) { if (e.key === "Enter") { show(index); } });
  });
  box.addEventListener("click", function (e) { if (e.target === box || e.target === shut || e.target === big) { hide(); } });
  window.addEventListener("resize", function () { if (!box.hidden) { fit(); } });
  doc.addEventListener("keydown", function (e) {
    if (box.hidden) { return; }
    if (e.key === "Escape") { hide(); }
    else if (e.key === "ArrowRight") { show(current + 1); }
    else if (e.key === "ArrowLeft") { show(current - 1); }
  });

  /* ---- "copy these paths" ---- */
  Array.prototype.forEach.call(doc.querySelectorAll("button[data-copy]"), function (button) {
    button.addEventListener("click", function () {
      var area = doc.getElementById(button.getAttribute("data-copy"));
      function done() { button.textContent = "Copied"; }
      function fallback() { area.focus(); area.select(); try { doc.execCommand("copy"); done(); } catch (err) {} }
      if (navigator.clipboard && navigator.clipboard.writeText) {
        navigator.clipboard.writeText(area.value).then(done, fallback);
      } else { fallback(); }
    });
  });

  /* ---- the full list ---- */
  var table = doc.getElementById("image-list");
  var controls = {sort: doc.getElementById("list-sort"), status: doc.getElementById("list-status"),
                  "class": doc.getElementById("list-class")};
  var shown = doc.getElementById("list-shown");
  var rows = table ? Array.prototype.slice.call(table.tBodies[0].rows) : [];
  var order = new Map(rows.map(function (row, index) { return [row, index]; }));

  function attr(row, key) { return row.getAttribute("data-" + key); }
  function number(row, key) { var v = parseFloat(attr(row, key)); return isNaN(v) ? null : v; }
  function byNumber(key, sign) {
    return function (a, b) {
      var x = number(a, key), y = number(b, key);
      if (x === null || y === null) { return (x === null) - (y === null); }
      return sign * (x - y);
    };
  }
  function byText(key) { return function (a, b) { var x = attr(a, key), y = attr(b, key); return x < y ? -1 : (x > y ? 1 : 0); }; }
  function chain(first, second) { return function (a, b) { return first(a, b) || second(a, b); }; }
  var sorts = {
    "class": chain(byText("class"), byNumber("rank", 1)), "rank": chain(byNumber("rank", 1), byText("class")),
    "eta-desc": byNumber("eta", -1), "eta-asc": byNumber("eta", 1),
    "memory-desc": byNumber("memory", -1), "memory-asc": byNumber("memory", 1), "path": byText("path")
  };
  function state() {
    var out = {};
    Object.keys(controls).forEach(function (key) { if (controls[key]) { out[key] = controls[key].value; } });
    return out;
  }
  function keeps(row, wanted) {
    var status = wanted.status || "all", cls = wanted["class"] || "";
    var statusOk = status === "all" || (status === "changed" ? attr(row, "decision") !== "auto" : attr(row, "status") === status);
    return statusOk && (!cls || attr(row, "class") === cls);
  }
  function apply(record) {
    if (!table) { return; }
    var wanted = state(), compare = sorts[wanted.sort] || sorts["class"], body = table.tBodies[0], count = 0;
    rows.slice().sort(function (a, b) { return compare(a, b) || order.get(a) - order.get(b); }).forEach(function (row) {
      row.hidden = !keeps(row, wanted);
      count += row.hidden ? 0 : 1;
      body.appendChild(row);
    });
    table.setAttribute("data-shown", String(count));
    if (shown) { shown.textContent = count + " of " + rows.length + " images"; }
    if (record && window.history && history.replaceState) {
      try { history.replaceState(null, "", "#list?" + new URLSearchParams(wanted).toString()); } catch (err) {}
    }
  }
  Object.keys(controls).forEach(function (key) {
    if (controls[key]) { controls[key].addEventListener("change", function () { apply(true); }); }
  });

  /* ---- the address: #list?sort=..&status=..&class=.., #card-12 ---- */
  function fromAddress() {
    var hash = window.location.hash;
    if (hash.indexOf("#list?") === 0 && table) {
      var params = new URLSearchParams(hash.slice(6));
      Object.keys(controls).forEach(function (key) {
        var control = controls[key];
        if (control && params.has(key)) {
          control.value = params.get(key);
          if (control.selectedIndex < 0) { control.selectedIndex = 0; }
        }
      });
      apply(false);
      doc.getElementById("list").scrollIntoView();
    } else if (/^#card-\d+$/.test(hash)) {
      var card = doc.getElementById(hash.slice(1)), picture = card && card.querySelector("img.zoom");
      if (picture) { show(pictures.indexOf(picture)); }
    }
  }
  window.addEventListener("hashchange", fromAddress);
  apply(false);
  fromAddress();
  doc.body.setAttribute("data-script", "ready");
})();
"""
