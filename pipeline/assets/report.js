/* remix cost report: sums the per-(day, run, key) records into the chosen period
   and stacking axis and draws them with Plotly.js (loaded beside the page). With
   #check in the URL it writes what the charts drew into <pre id="check">, for the
   browser test. */
(function () {
  "use strict";
  const errors = [];
  window.addEventListener("error", (e) => errors.push(String(e.message || e)));
  const consoleError = console.error.bind(console);
  console.error = (...args) => {
    errors.push(args.map(String).join(" "));
    consoleError(...args);
  };

  const data = JSON.parse(document.getElementById("cost-data").textContent);
  const MAX_GROUPS = 12;
  const OTHER = "(other)";
  const NONE = "(none)";
  const PALETTE = [
    "#4269d0", "#efb118", "#ff725c", "#6cc5b0", "#3ca951", "#ff8ab7",
    "#a463f2", "#97bbf5", "#9c6b4e", "#9498a0", "#2f4b7c", "#d45087", "#bab0ac",
  ];
  const money = (v) => "$" + v.toFixed(4);
  const config = { displaylogo: false, displayModeBar: false, responsive: true };

  /* Records are rows of data.fields: day, run and key are indexes into
     data.days[period], data.runs and data.keys ([reference, variant, axes]). */
  const F = Object.fromEntries(data.fields.map((name, i) => [name, i]));

  function groupOf(record, stack) {
    if (stack === "run") return data.runs[record[F.run]];
    const [reference, variant, axes] = data.keys[record[F.key]];
    if (stack === "reference") return reference;
    if (stack === "variant") return variant;
    const axis = stack.slice("axis:".length);
    return Object.prototype.hasOwnProperty.call(axes, axis) ? axes[axis] : NONE;
  }

  /* Per period: totals; per stack group: cost and failures per period. */
  function aggregate(period, stack) {
    const periods = data.periods[period];
    const index = new Map(periods.map((p, i) => [p, i]));
    const zeros = () => periods.map(() => 0);
    const totals = { cost: zeros(), estimate: zeros(), images: zeros(), failed: zeros() };
    const groups = new Map();
    const labels = data.days[period];
    for (const r of data.records) {
      const i = index.get(labels[r[F.day]]);
      if (i === undefined) continue;
      const cost = r[F.cost];
      totals.cost[i] += cost;
      totals.estimate[i] += r[F.estimate];
      totals.images[i] += r[F.images];
      totals.failed[i] += r[F.failed];
      const name = groupOf(r, stack);
      let g = groups.get(name);
      if (!g) {
        g = { name, total: 0, cost: zeros(), failed: zeros(), images: zeros() };
        groups.set(name, g);
      }
      g.total += cost;
      g.cost[i] += cost;
      g.failed[i] += r[F.failed];
      g.images[i] += r[F.images];
    }
    let ordered = [...groups.values()].sort(
      (a, b) => b.total - a.total || String(a.name).localeCompare(String(b.name)),
    );
    if (ordered.length > MAX_GROUPS) {
      const other = { name: OTHER, total: 0, cost: zeros(), failed: zeros(), images: zeros() };
      for (const g of ordered.slice(MAX_GROUPS - 1)) {
        other.total += g.total;
        g.cost.forEach((v, i) => (other.cost[i] += v));
        g.failed.forEach((v, i) => (other.failed[i] += v));
        g.images.forEach((v, i) => (other.images[i] += v));
      }
      ordered = [...ordered.slice(0, MAX_GROUPS - 1), other];
    }
    return { periods, totals, groups: ordered };
  }

  function layout(extra) {
    return Object.assign(
      {
        margin: { l: 60, r: 60, t: 10, b: 60 },
        barmode: "stack",
        hovermode: "x unified",
        legend: { orientation: "h", y: -0.2 },
        xaxis: { type: "category", automargin: true },
        yaxis: { rangemode: "tozero", automargin: true },
        paper_bgcolor: "rgba(0,0,0,0)",
        plot_bgcolor: "rgba(0,0,0,0)",
      },
      extra,
    );
  }

  function draw() {
    const period = document.getElementById("period").value;
    const stack = document.getElementById("stack").value;
    for (const el of document.querySelectorAll(".period-name")) el.textContent = period;
    const a = aggregate(period, stack);
    const x = a.periods;
    const color = (i) => PALETTE[i % PALETTE.length];

    let running = 0;
    const cumulative = a.totals.cost.map((v) => (running += v));
    const drawing = [];
    drawing.push(Plotly.react(
      "spend",
      [
        ...a.groups.map((g, i) => ({
          type: "bar",
          name: String(g.name),
          x,
          y: g.cost,
          marker: { color: color(i) },
          hovertemplate: "%{y:$.4f}",
        })),
        {
          type: "scatter",
          mode: "lines+markers",
          name: "cumulative",
          x,
          y: cumulative,
          yaxis: "y2",
          line: { color: "#1d2330", width: 2 },
          hovertemplate: "%{y:$.4f}",
        },
      ],
      layout({
        yaxis: { title: { text: "spend $" }, rangemode: "tozero", tickformat: "$.2f" },
        yaxis2: {
          title: { text: "cumulative $" },
          overlaying: "y",
          side: "right",
          rangemode: "tozero",
          tickformat: "$.2f",
          showgrid: false,
        },
      }),
      config,
    ));

    const perImage = (cost, images) => cost.map((c, i) => (images[i] ? c / images[i] : null));
    drawing.push(Plotly.react(
      "per-image",
      [
        {
          type: "scatter",
          mode: "lines+markers",
          name: "all",
          x,
          y: perImage(a.totals.cost, a.totals.images),
          line: { color: "#1d2330", width: 3 },
          connectgaps: false,
          hovertemplate: "%{y:$.4f}",
        },
        ...a.groups.map((g, i) => ({
          type: "scatter",
          mode: "lines+markers",
          name: String(g.name),
          x,
          y: perImage(g.cost, g.images),
          line: { color: color(i), dash: "dot" },
          visible: "legendonly",
          hovertemplate: "%{y:$.4f}",
        })),
      ],
      layout({ yaxis: { title: { text: "$ per image" }, rangemode: "tozero", tickformat: "$.3f" } }),
      config,
    ));

    drawing.push(Plotly.react(
      "failures",
      a.groups.map((g, i) => ({
        type: "bar",
        name: String(g.name),
        x,
        y: g.failed,
        marker: { color: color(i) },
      })),
      layout({
        yaxis: {
          title: { text: "failed tasks" },
          rangemode: "tozero",
          tickformat: "d",
          dtick: Math.max(...a.totals.failed, 0) <= 10 ? 1 : null,
        },
      }),
      config,
    ));

    drawing.push(Plotly.react(
      "estimate",
      [
        { type: "bar", name: "estimate", x, y: a.totals.estimate, marker: { color: "#97bbf5" }, hovertemplate: "%{y:$.4f}" },
        { type: "bar", name: "actual", x, y: a.totals.cost, marker: { color: "#4269d0" }, hovertemplate: "%{y:$.4f}" },
      ],
      layout({ barmode: "group", yaxis: { title: { text: "$" }, rangemode: "tozero", tickformat: "$.2f" } }),
      config,
    ));
    return Promise.all(drawing);
  }

  function drawReferences() {
    const refs = data.top_references.slice().reverse();
    return Plotly.react(
      "references",
      [
        {
          type: "bar",
          orientation: "h",
          name: "cost",
          y: refs.map((r) => r.reference),
          x: refs.map((r) => r.cost),
          marker: { color: "#ff725c" },
          hovertemplate: "%{y}: %{x:$.4f}<extra></extra>",
        },
      ],
      layout({
        hovermode: "closest",
        showlegend: false,
        margin: { l: 10, r: 20, t: 10, b: 40 },
        xaxis: { title: { text: "$" }, tickformat: "$.2f", rangemode: "tozero" },
        yaxis: { type: "category", automargin: true },
      }),
      config,
    );
  }

  /* What a chart drew: each trace's values as Plotly computed them, and the
     values read back from the heights of the SVG bars it rendered. */
  function drawn(id) {
    const gd = document.getElementById(id);
    const yaxis = gd._fullLayout.yaxis;
    const perPx = yaxis && yaxis.range ? (yaxis.range[1] - yaxis.range[0]) / yaxis._length : 0;
    const layers = gd.querySelectorAll(".barlayer .trace");
    let bar = 0;
    return gd._fullData.map((t, i) => {
      const out = {
        name: t.name,
        type: t.type,
        x: Array.from((t.orientation === "h" ? t.y : t.x) || []),
        y: gd.calcdata[i].map((c) => (t.type === "bar" ? c.s : c.y)),
      };
      if (t.type === "bar" && t.orientation !== "h" && t.visible === true) {
        const layer = layers[bar++];
        out.svg = Array.from(layer ? layer.querySelectorAll(".point path") : []).map(
          (p) => p.getBBox().height * perPx,
        );
      }
      return out;
    });
  }

  async function check() {
    const charts = ["spend", "per-image", "failures", "estimate", "references"];
    const result = {
      errors,
      plotly: Plotly.version,
      period: document.getElementById("period").value,
      stack: document.getElementById("stack").value,
      charts: Object.fromEntries(charts.map((id) => [id, drawn(id)])),
      svg_bars: document.querySelectorAll("#spend .barlayer .point path").length,
    };
    const period = document.getElementById("period");
    const stack = document.getElementById("stack");
    period.value = "week";
    stack.value = "reference";
    period.dispatchEvent(new Event("change"));
    stack.dispatchEvent(new Event("change"));
    await draw();
    result.switched = { period: period.value, stack: stack.value, spend: drawn("spend") };
    const out = document.getElementById("check");
    out.textContent = JSON.stringify(result);
    out.hidden = false;
  }

  if (typeof Plotly === "undefined") {
    const p = document.createElement("p");
    p.className = "error";
    p.textContent =
      "The charts need plotly.js, written beside this page; it did not load. " +
      "Write the report again with remix report --format html.";
    document.querySelector("main").prepend(p);
    errors.push("plotly.js did not load");
    if (location.hash === "#check") {
      document.getElementById("check").textContent = JSON.stringify({ errors });
    }
    return;
  }
  document.getElementById("period").addEventListener("change", draw);
  document.getElementById("stack").addEventListener("change", draw);
  Promise.all([draw(), drawReferences()])
    .then(() => (location.hash === "#check" ? check() : undefined))
    .catch((e) => {
      console.error(e && e.stack ? e.stack : e);
      if (location.hash === "#check") {
        document.getElementById("check").textContent = JSON.stringify({ errors });
      }
    });
})();
