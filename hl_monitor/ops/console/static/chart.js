/* hl-monitor's tiny SVG charts: step/line series over time and diverging long/short bars.
   Written for the console (no dependency, no inline styles: CSP-safe). Text goes in through textContent only. */
"use strict";
(function () {
  const NS = "http://www.w3.org/2000/svg";
  const PALETTE = ["#2456c7", "#14804a", "#c2352b", "#c98a00", "#7a3fc2", "#0f8a99", "#b5477a", "#4d5a6e"];

  function el(name, attrs) {
    const node = document.createElementNS(NS, name);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, String(v));
    return node;
  }
  function text(x, y, value, anchor) {
    const node = el("text", { x, y, "text-anchor": anchor || "start" });
    node.textContent = value;
    return node;
  }
  function compact(v) {
    const a = Math.abs(v);
    if (a >= 1e9) return (v / 1e9).toFixed(1) + "B";
    if (a >= 1e6) return (v / 1e6).toFixed(1) + "M";
    if (a >= 1e3) return (v / 1e3).toFixed(1) + "k";
    return (Math.round(v * 100) / 100).toString();
  }
  function clock(ms) {
    const d = new Date(ms);
    return d.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
  }

  /* series: [{name, points: [[timeMs, value], ...]}]; step: hold each value until the next point. */
  function lines(container, series, opts) {
    const o = Object.assign({ width: container.clientWidth || 640, height: 200, step: false, now: Date.now() }, opts || {});
    const pad = { l: 56, r: 12, t: 10, b: 24 };
    const pts = series.flatMap((s) => s.points);
    container.replaceChildren();
    if (!pts.length) {
      const p = document.createElement("p");
      p.className = "muted";
      p.textContent = o.empty || "No history yet.";
      container.append(p);
      return;
    }
    let t0 = Math.min(...pts.map((p) => p[0])), t1 = Math.max(o.now, ...pts.map((p) => p[0]));
    let v0 = Math.min(0, ...pts.map((p) => p[1])), v1 = Math.max(0, ...pts.map((p) => p[1]));
    if (t1 === t0) t0 -= 60000;
    if (v1 === v0) v1 = v0 + 1;
    const W = o.width - pad.l - pad.r, H = o.height - pad.t - pad.b;
    const x = (t) => pad.l + ((t - t0) / (t1 - t0)) * W;
    const y = (v) => pad.t + (1 - (v - v0) / (v1 - v0)) * H;
    const svg = el("svg", { viewBox: `0 0 ${o.width} ${o.height}`, role: "img" });
    for (let i = 0; i <= 4; i++) {
      const v = v0 + ((v1 - v0) * i) / 4;
      svg.append(el("line", { x1: pad.l, x2: o.width - pad.r, y1: y(v), y2: y(v), class: "axis" }));
      svg.append(text(pad.l - 6, y(v) + 4, compact(v), "end"));
    }
    svg.append(text(pad.l, o.height - 6, clock(t0)));
    svg.append(text(o.width - pad.r, o.height - 6, clock(t1), "end"));
    const legend = document.createElement("div");
    legend.className = "legend";
    series.forEach((s, i) => {
      const color = PALETTE[i % PALETTE.length];
      const sorted = s.points.slice().sort((a, b) => a[0] - b[0]);
      let d = "";
      sorted.forEach((p, j) => {
        if (j === 0) d += `M${x(p[0])},${y(p[1])}`;
        else if (o.step) d += `H${x(p[0])}V${y(p[1])}`;
        else d += `L${x(p[0])},${y(p[1])}`;
      });
      if (o.step && sorted.length) d += `H${x(t1)}`;
      svg.append(el("path", { d, fill: "none", stroke: color, "stroke-width": 2 }));
      if (sorted.length === 1) svg.append(el("circle", { cx: x(sorted[0][0]), cy: y(sorted[0][1]), r: 3, fill: color }));
      const item = document.createElement("span");
      const swatch = document.createElement("i");
      swatch.className = "swatch-" + (i % PALETTE.length);
      item.append(swatch, document.createTextNode(s.name));
      legend.append(item);
    });
    container.append(svg, legend);
  }

  /* rows: [{label, long, short, net}]: long to the right, short to the left of a shared zero line. */
  function bias(container, rows, opts) {
    const o = Object.assign({ width: container.clientWidth || 640, row: 26 }, opts || {});
    container.replaceChildren();
    if (!rows.length) {
      const p = document.createElement("p");
      p.className = "muted";
      p.textContent = o.empty || "No positions yet.";
      container.append(p);
      return;
    }
    const labelW = 96, pad = 8, height = rows.length * o.row + 24;
    const max = Math.max(1, ...rows.map((r) => Math.max(r.long, r.short)));
    const room = 70; // the net label beside the longer bar
    const half = (o.width - labelW - pad * 2 - room * 2) / 2, mid = labelW + pad + room + half;
    const svg = el("svg", { viewBox: `0 0 ${o.width} ${height}`, role: "img" });
    rows.forEach((r, i) => {
      const y = i * o.row + 4, h = o.row - 8;
      svg.append(text(labelW - 4, y + h - 3, r.label, "end"));
      const lw = (r.long / max) * half, sw = (r.short / max) * half;
      svg.append(el("rect", { x: mid, y, width: Math.max(lw, 0.5), height: h, fill: "#2fb36b" }));
      svg.append(el("rect", { x: mid - sw, y, width: Math.max(sw, 0.5), height: h, fill: "#d9534f" }));
      const net = text(r.net >= 0 ? mid + lw + 4 : mid - sw - 4, y + h - 3, "net " + compact(r.net), r.net >= 0 ? "start" : "end");
      svg.append(net);
    });
    svg.append(el("line", { x1: mid, x2: mid, y1: 0, y2: height - 20, stroke: "#9aa3b2" }));
    svg.append(text(mid - 4, height - 6, "← short", "end"));
    svg.append(text(mid + 4, height - 6, "long →"));
    container.append(svg);
  }

  window.HLChart = { lines, bias, palette: PALETTE, compact };
})();
