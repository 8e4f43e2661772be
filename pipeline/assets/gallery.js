
(function () {
  "use strict";
  var meta = JSON.parse(document.getElementById("data").textContent);
  var S = meta.strings, cells = meta.cells;
  var checking = location.hash === "#check";
  if (checking) {
    // Headless checks see the whole page: load every image now, not on scroll.
    document.querySelectorAll("img[loading=lazy]").forEach(function (img) {
      img.loading = "eager";
    });
  }
  var grid = document.querySelector("table.grid");
  var $ = function (id) { return document.getElementById(id); };
  var pinned = null;
  function str(i) { return i === null || i === undefined ? "" : S[i]; }
  function setText(id, text) {
    var el = $(id);
    el.textContent = text;
    var row = el.closest("[data-row]");
    if (row) row.hidden = !text;
  }
  function show(td, imgIndex) {
    var c = cells[+td.dataset.c];
    if (!c) return;
    var img = c.i.length ? c.i[Math.min(imgIndex || 0, c.i.length - 1)] : null;
    $("d-hint").hidden = true;
    $("d-body").hidden = false;
    $("d-key").textContent = c.k;
    var st = $("d-status");
    var label = {done: "done", partial: "partly done", failed: "failed",
      pending: "in flight", "not-run": "not run yet"}[c.s] || c.s;
    if (img && c.i.length > 1) {
      label += " \u00b7 image " + (img.n + 1) + " of " + c.i.length;
    }
    st.textContent = label;
    st.className = "status " + c.s;
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
    setText("d-prompt", str(c.p));
    setText("d-negative", str(c.n));
    setText("d-seed", img && img.seed !== null ? String(img.seed) : "");
    setText("d-cost", img && img.cost !== null ? "$" + img.cost : "");
    setText("d-error", c.e ? c.e[0] + ": " + c.e[1] : "");
    setText("d-task", c.t || "");
    setText("d-image", img ? img.u : "");
    setText("d-file", img ? img.f : "");
    $("d-params").textContent = str(c.q);
    $("d-params-box").hidden = c.q === null || c.q === undefined;
  }
  function target(ev) {
    var td = ev.target.closest ? ev.target.closest("td.cell") : null;
    if (!td) return null;
    var a = ev.target.closest("[data-i]");
    return {td: td, i: a ? +a.dataset.i : 0};
  }
  function pin(td, i) {
    if (pinned) pinned.classList.remove("sel");
    pinned = td;
    if (td) { td.classList.add("sel"); show(td, i); }
  }
  grid && grid.addEventListener("mouseover", function (ev) {
    var t = target(ev);
    if (t && !pinned) show(t.td, t.i);
  });
  grid && grid.addEventListener("click", function (ev) {
    var t = target(ev);
    if (!t) return;
    if (ev.target.closest("a") && !ev.metaKey && !ev.ctrlKey && pinned !== t.td) {
      ev.preventDefault();  // first click selects; a second one opens the image
    }
    pin(t.td, t.i);
  });
  grid && grid.addEventListener("keydown", function (ev) {
    var t = target(ev);
    if (t && (ev.key === "Enter" || ev.key === " ")) {
      ev.preventDefault();
      pin(t.td, t.i);
    }
  });
  document.addEventListener("keydown", function (ev) {
    if (ev.key === "Escape") pin(null);
  });
  var size = $("size");
  size && size.addEventListener("input", function () {
    document.documentElement.style.setProperty("--thumb", size.value + "px");
  });
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
  if (checking) {
    window.addEventListener("load", function () {
      var imgs = Array.prototype.slice.call(document.images).filter(function (i) {
        return i.id !== "d-preview";
      });
      // Synchronous on purpose: the load event waited for every (eager) image,
      // and a headless --dump-dom does not wait for promises.
      (function () {
        var tds = document.querySelectorAll("td.cell");
        var pairs = {};
        tds.forEach(function (td) {
          pairs[td.dataset.ref + "\u0000" + td.dataset.variant] = 1;
        });
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
