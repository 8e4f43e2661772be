(function () {
  "use strict";
  var meta = JSON.parse(document.getElementById("data").textContent);
  var S = meta.strings, cells = meta.cells, runs = meta.runs || [];
  var checking = location.hash === "#check";
  if (checking) {
    // Headless checks see the whole page: load every image now, not on scroll.
    document.querySelectorAll("img[loading=lazy]").forEach(function (img) {
      img.loading = "eager";
    });
  }
  var app = document.querySelector(".app");
  var grid = document.querySelector("table.grid");
  var $ = function (id) { return document.getElementById(id); };
  var pinned = null;
  var LABELS = {done: "done", partial: "partly done", failed: "failed",
    pending: "in flight", "not-run": "not run yet"};
  function str(i) { return i === null || i === undefined ? "" : S[i]; }
  function setText(id, text) {
    var el = $(id);
    if (!el) return;
    el.textContent = text;
    var row = el.closest("[data-row]");
    if (row) row.hidden = !text;
  }
  function imageOf(c, imgIndex) {
    return c.i.length ? c.i[Math.min(imgIndex || 0, c.i.length - 1)] : null;
  }
  function statusLabel(c, img) {
    var label = LABELS[c.s] || c.s;
    if (img && img.r !== null && img.r !== undefined && runs.length) {
      label += " \u00b7 " + runs[img.r];
    }
    if (img && c.i.length > 1) {
      label += " \u00b7 image " + (c.i.indexOf(img) + 1) + " of " + c.i.length;
    }
    return label;
  }
  // The details of a cell, into the panel ("d-") or the lightbox ("lb-").
  function details(prefix, c, img) {
    $(prefix + "key").textContent = c.k;
    var st = $(prefix + "status");
    st.textContent = statusLabel(c, img);
    st.className = "status " + c.s;
    setText(prefix + "prompt", str(c.p));
    setText(prefix + "negative", str(c.n));
    setText(prefix + "seed", img && img.seed !== null ? String(img.seed) : "");
    setText(prefix + "cost", img && img.cost !== null ? "$" + img.cost : "");
    setText(prefix + "error", c.e ? c.e[0] + ": " + c.e[1] : "");
    setText(prefix + "task", c.t || "");
    setText(prefix + "image", img ? img.u : "");
    setText(prefix + "file", img ? img.f : "");
    $(prefix + "params").textContent = str(c.q);
  }
  function show(td, imgIndex) {
    var c = cells[+td.dataset.c];
    if (!c) return;
    var img = imageOf(c, imgIndex);
    $("d-hint").hidden = true;
    $("d-body").hidden = false;
    details("d-", c, img);
    var pv = $("d-preview");
    if (img && img.th) {
      pv.src = img.th;
      pv.hidden = false;
    } else {
      pv.hidden = true;
      pv.removeAttribute("src");
    }
    var open = $("d-open");
    if (img) { open.href = img.f; open.hidden = false; } else { open.hidden = true; }
    $("d-params-box").hidden = c.q === null || c.q === undefined;
  }
  function target(ev) {
    var td = ev.target.closest ? ev.target.closest("td.cell") : null;
    if (!td) return null;
    var a = ev.target.closest("[data-i]");
    return {td: td, i: a ? +a.dataset.i : 0, onImage: !!a};
  }
  // The details panel takes room only while a cell is pinned.
  function pin(td, i) {
    if (pinned) pinned.classList.remove("sel");
    pinned = td;
    app.classList.toggle("pinned", !!td);
    fit();
    if (td) { td.classList.add("sel"); show(td, i); }
  }

  // Picks: starred keys, kept in localStorage per gallery, exported as JSON.
  var storeKey = app.dataset.store;
  var picks = {};
  function loadPicks() {
    var saved = null;
    try { saved = JSON.parse(localStorage.getItem(storeKey) || "null"); }
    catch (e) { saved = null; }
    (Array.isArray(saved) ? saved : meta.picks).forEach(function (k) {
      picks[k] = true;
    });
  }
  function savePicks() {
    try { localStorage.setItem(storeKey, JSON.stringify(Object.keys(picks))); }
    catch (e) { /* private mode: picks last for this visit */ }
  }
  function exportData() {
    var byKey = {};
    cells.forEach(function (c) { byKey[c.k] = c; });
    return {
      format: "remix-picks",
      version: 1,
      gallery: storeKey,
      picks: Object.keys(picks).sort().map(function (k) {
        var c = byKey[k];
        return {
          key: k,
          images: c ? c.i.map(function (img) { return img.f; }) : []
        };
      })
    };
  }
  function refreshPicks() {
    document.querySelectorAll("td.cell").forEach(function (td) {
      var on = !!picks[td.dataset.key];
      td.classList.toggle("picked", on);
      var star = td.querySelector(".star");
      if (star) star.setAttribute("aria-pressed", on ? "true" : "false");
    });
    var n = Object.keys(picks).length;
    $("pick-count").textContent = n + " picked";
    $("picks-export").textContent = JSON.stringify(exportData());
  }
  function togglePick(td) {
    var key = td.dataset.key;
    if (picks[key]) delete picks[key]; else picks[key] = true;
    savePicks();
    refreshPicks();
    if (current === td) lightboxStar();
  }
  $("export-picks").addEventListener("click", function () {
    var text = JSON.stringify(exportData(), null, 2) + "\n";
    var a = document.createElement("a");
    a.href = URL.createObjectURL(new Blob([text], {type: "application/json"}));
    a.download = "picks.json";
    document.body.appendChild(a);
    a.click();
    a.remove();
  });
  $("only-picks").addEventListener("change", function () {
    document.body.classList.toggle("only-picks", this.checked);
  });

  // Lightbox: the image large, the details alongside; arrows move, Esc closes.
  var box = $("lightbox");
  var current = null;
  function visibleCells() {
    return Array.prototype.filter.call(document.querySelectorAll("td.cell"),
      function (td) { return td.offsetParent !== null || td === current; });
  }
  function lightboxStar() {
    var on = !!(current && picks[current.dataset.key]);
    $("lb-star").setAttribute("aria-pressed", on ? "true" : "false");
  }
  function openBox(td, i) {
    var c = cells[+td.dataset.c];
    if (!c) return;
    current = td;
    var img = imageOf(c, i);
    var big = $("lb-img");
    if (img && img.th !== null) {
      big.src = img.f;
      big.alt = c.k;
      big.hidden = false;
      $("lb-none").hidden = true;
    } else {
      big.removeAttribute("src");
      big.hidden = true;
      $("lb-none").textContent = img ? "the image file is missing or unreadable" : statusLabel(c, null);
      $("lb-none").hidden = false;
    }
    details("lb-", c, img);
    lightboxStar();
    box.hidden = false;
    box.dataset.key = c.k;
    td.focus({preventScroll: true});
    td.scrollIntoView({block: "nearest", inline: "nearest"});
  }
  function closeBox() {
    box.hidden = true;
    current = null;
  }
  function step(delta) {
    var all = visibleCells();
    var at = all.indexOf(current);
    var next = all[at + delta];
    if (next) openBox(next, 0);
  }
  function stepRow(delta) {
    var row = current.parentElement;
    for (var r = delta > 0 ? row.nextElementSibling : row.previousElementSibling; r;
         r = delta > 0 ? r.nextElementSibling : r.previousElementSibling) {
      var same = Array.prototype.find.call(r.querySelectorAll("td.cell"), function (td) {
        return td.dataset.variant === current.dataset.variant &&
          td.dataset.combo === current.dataset.combo;
      });
      if (same) { openBox(same, 0); return; }
    }
  }
  $("lb-star").addEventListener("click", function () {
    if (current) togglePick(current);
  });
  box.addEventListener("click", function (ev) {
    if (ev.target === box) closeBox();
  });

  grid && grid.addEventListener("mouseover", function (ev) {
    var t = target(ev);
    if (t && !pinned) show(t.td, t.i);
  });
  grid && grid.addEventListener("click", function (ev) {
    var t = target(ev);
    if (!t) return;
    if (ev.target.closest(".star")) { togglePick(t.td); return; }
    if (ev.metaKey || ev.ctrlKey || ev.shiftKey) return;  // the browser opens it
    if (t.onImage) {
      ev.preventDefault();
      openBox(t.td, t.i);
    } else {
      pin(pinned === t.td ? null : t.td, t.i);
    }
  });
  grid && grid.addEventListener("keydown", function (ev) {
    var t = target(ev);
    if (!t || !box.hidden) return;
    if (ev.key === "Enter" || ev.key === " ") {
      ev.preventDefault();
      openBox(t.td, 0);
    } else if (ev.key === "s") {
      togglePick(t.td);
    } else if (ev.key === "p") {
      pin(t.td, 0);
    }
  });
  document.addEventListener("keydown", function (ev) {
    if (!box.hidden && current) {
      var moves = {ArrowRight: function () { step(1); },
        ArrowLeft: function () { step(-1); },
        ArrowDown: function () { stepRow(1); },
        ArrowUp: function () { stepRow(-1); },
        Escape: closeBox,
        s: function () { togglePick(current); }};
      if (moves[ev.key]) { ev.preventDefault(); moves[ev.key](); }
      return;
    }
    if (ev.key === "Escape") pin(null);
  });
  var size = $("size");
  function setSize(px) {
    document.documentElement.style.setProperty("--thumb", px + "px");
  }
  size && size.addEventListener("input", function () { setSize(size.value); });
  // Until the slider is moved, thumbnails shrink (down to the slider's minimum)
  // so that a few variants x strengths fit the window without scrolling sideways.
  function fit() {
    if (!grid || !size || size.dataset.moved) return;
    var row = grid.querySelector("tbody tr");
    if (!row) return;
    var columns = row.querySelectorAll("td").length;
    var ref = row.querySelector("th.ref");
    var room = $("scroller").clientWidth - (ref ? ref.offsetWidth : 0) - 24;
    var px = Math.floor(room / Math.max(1, columns)) - 12;
    px = Math.max(+size.min, Math.min(+size.defaultValue, px - px % +size.step));
    size.value = px;
    setSize(px);
  }
  size && size.addEventListener("change", function () { size.dataset.moved = "1"; });
  fit();
  window.addEventListener("resize", fit);
  // Axis filters: hide the sub-columns whose values do not match, via one style rule.
  var selects = document.querySelectorAll("select[data-axis]");
  var rule = $("filter-rule");
  function applyFilters() {
    var want = {};
    selects.forEach(function (s) { if (s.value) want[s.dataset.axis] = s.value; });
    var hidden = [];
    meta.combos.forEach(function (axes, i) {
      for (var name in want) {
        if (axes[name] !== want[name]) { hidden.push(i); return; }
      }
    });
    rule.textContent = hidden.map(function (i) {
      return '.grid [data-combo="' + i + '"]';
    }).join(",") + (hidden.length ? "{display:none}" : "");
    var visible = meta.combos.length - hidden.length;
    document.querySelectorAll("th.variant").forEach(function (th) {
      th.colSpan = Math.max(1, visible);
    });
  }
  selects.forEach(function (s) { s.addEventListener("change", applyFilters); });
  loadPicks();
  refreshPicks();
  if (checking) {
    window.addEventListener("load", function () {
      var imgs = Array.prototype.slice.call(document.images).filter(function (i) {
        return i.id !== "d-preview" && i.id !== "lb-img";
      });
      // Synchronous on purpose: the load event waited for every (eager) image,
      // and a headless --dump-dom does not wait for promises.
      (function () {
        var tds = document.querySelectorAll("td.cell");
        var pairs = {};
        tds.forEach(function (td) {
          pairs[td.dataset.ref + "\u0000" + td.dataset.variant] = 1;
        });
        var panelWidth = $("panel").getBoundingClientRect().width;
        var first = document.querySelector("td.cell.done") || tds[0];
        if (first) pin(first, 0);
        var result = {
          images: imgs.length,
          loaded: imgs.filter(function (i) {
            return i.complete && i.naturalWidth > 0;
          }).length,
          broken: imgs.filter(function (i) { return !(i.naturalWidth > 0); })
            .map(function (i) { return i.getAttribute("src"); }),
          cells: tds.length,
          pairs: Object.keys(pairs).length,
          references: document.querySelectorAll("tbody th.ref").length,
          variants: document.querySelectorAll("thead th.variant").length,
          failed: document.querySelectorAll("td.cell.failed").length,
          unpinned_panel_width: panelWidth,
          selected_key: first ? first.dataset.key : null,
          panel_key: $("d-key").textContent,
          panel_prompt: $("d-prompt").textContent,
          panel_seed: $("d-seed").textContent,
          panel_cost: $("d-cost").textContent
        };
        $("check").textContent = JSON.stringify(result);
        document.documentElement.dataset.checked = "1";
      })();
    });
  }
})();
