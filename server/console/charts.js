// Small SVG line charts (loss curves, tokens/s): no library, nothing fetched.
const NS = "http://www.w3.org/2000/svg";
const COLORS = ["#2f6fde", "#e8590c", "#18794e", "#b42318", "#7048e8"];

function el(name, attrs = {}, text) {
  const node = document.createElementNS(NS, name);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  return node;
}

function fmt(v) {
  if (v === 0) return "0";
  const a = Math.abs(v);
  return a >= 100 ? v.toFixed(0) : a >= 1 ? v.toFixed(2) : v.toPrecision(2);
}

// series: [{name, points: [[x, y], ...], dots?: bool}]
export function lineChart(series, { width = 560, height = 220, xLabel = "", yLabel = "", title = "" } = {}) {
  const left = 52, right = 12, top = title ? 26 : 10, bottom = 34;
  const svg = el("svg", { width, height, viewBox: `0 0 ${width} ${height}`, role: "img", "aria-label": title || yLabel, "font-family": "sans-serif", class: "line-chart" });
  if (title) svg.append(el("text", { x: left, y: 16, "font-size": 13, "font-weight": "bold" }, title));
  const all = series.flatMap((s) => s.points);
  if (!all.length) {
    svg.append(el("text", { x: width / 2, y: height / 2, "text-anchor": "middle", fill: "#6b7280", "font-size": 12 }, "no data yet"));
    return svg;
  }
  let [x0, x1] = [Math.min(...all.map((p) => p[0])), Math.max(...all.map((p) => p[0]))];
  let [y0, y1] = [Math.min(0, ...all.map((p) => p[1])), Math.max(...all.map((p) => p[1]))];
  if (x1 === x0) x1 = x0 + 1;
  if (y1 === y0) y1 = y0 + 1;
  y1 *= 1.08;
  const pw = width - left - right, ph = height - top - bottom;
  const sx = (x) => left + ((x - x0) / (x1 - x0)) * pw;
  const sy = (y) => top + ph - ((y - y0) / (y1 - y0)) * ph;
  for (let k = 0; k <= 4; k++) {
    const v = y0 + ((y1 - y0) * k) / 4, y = sy(v);
    svg.append(el("line", { x1: left, x2: left + pw, y1: y, y2: y, stroke: "#e5e7eb" }));
    svg.append(el("text", { x: left - 5, y: y + 4, "font-size": 10, "text-anchor": "end", fill: "#6b7280" }, fmt(v)));
  }
  for (let k = 0; k <= 4; k++) {
    const v = x0 + ((x1 - x0) * k) / 4;
    svg.append(el("text", { x: sx(v), y: top + ph + 14, "font-size": 10, "text-anchor": "middle", fill: "#6b7280" }, fmt(v)));
  }
  if (xLabel) svg.append(el("text", { x: left + pw / 2, y: height - 4, "font-size": 11, "text-anchor": "middle", fill: "#6b7280" }, xLabel));
  if (yLabel) svg.append(el("text", { x: 12, y: top + ph / 2, "font-size": 11, "text-anchor": "middle", fill: "#6b7280", transform: `rotate(-90 12 ${top + ph / 2})` }, yLabel));
  series.forEach((s, i) => {
    const color = COLORS[i % COLORS.length];
    if (s.points.length > 1 && !s.dots) {
      const d = s.points.map((p, j) => `${j ? "L" : "M"}${sx(p[0]).toFixed(1)} ${sy(p[1]).toFixed(1)}`).join("");
      svg.append(el("path", { d, fill: "none", stroke: color, "stroke-width": 2, class: "series" }));
    }
    for (const p of s.points.length <= 60 || s.dots ? s.points : []) {
      const c = el("circle", { cx: sx(p[0]), cy: sy(p[1]), r: s.dots ? 5 : 2.5, fill: color });
      c.append(el("title", {}, `${s.name}: ${fmt(p[1])} at ${fmt(p[0])}`));
      svg.append(c);
    }
  });
  // the legend last, on a backdrop, so no line runs through it
  const legend = el("g", { class: "legend" });
  legend.append(el("rect", { x: left + pw - 126, y: top, width: 124, height: series.length * 16 + 6, fill: "#fff", "fill-opacity": 0.85 }));
  series.forEach((s, i) => {
    legend.append(el("rect", { x: left + pw - 120, y: top + 4 + i * 16, width: 10, height: 10, fill: COLORS[i % COLORS.length] }));
    legend.append(el("text", { x: left + pw - 105, y: top + 13 + i * 16, "font-size": 11 }, s.name));
  });
  svg.append(legend);
  return svg;
}
