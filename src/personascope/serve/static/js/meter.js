// The live trait meter: answer tokens coloured by their projection on one vector, and a per-token chart.

// Per-vector colour scale: the largest |projection| seen this session (never below the alert threshold),
// so that colours stay comparable from one answer to the next.
const scales = new Map();

export function noteScale(name, values, threshold) {
  let scale = Math.max(scales.get(name) || 0, Math.abs(threshold || 0));
  for (const v of values) if (Number.isFinite(v)) scale = Math.max(scale, Math.abs(v));
  scales.set(name, scale);
}

export function scaleOf(name) {
  return scales.get(name) || 1;
}

// Diverging colour: blue below zero, orange above, white at zero; alpha grows with |value| / scale.
export function colour(value, scale) {
  const t = Math.max(-1, Math.min(1, value / (scale || 1)));
  const [r, g, b] = t >= 0 ? [234, 88, 12] : [37, 99, 235];
  return `rgba(${r}, ${g}, ${b}, ${(Math.abs(t) * 0.8).toFixed(3)})`;
}

export function fmt(value, digits = 2) {
  return Number.isFinite(value) ? value.toFixed(digits) : "–";
}

const mean = (xs) => (xs.length ? xs.reduce((a, b) => a + b, 0) / xs.length : NaN);

// One answer as it streams in: text pieces, each with the per-token projections of every traced vector.
export class TokenView {
  constructor(element) {
    this.element = element;
    this.pieces = [];
    this.vector = null;
    element.replaceChildren();
  }

  add(text, trace) {
    const piece = { text, trace: trace || {}, span: document.createElement("span") };
    piece.span.className = "tok";
    piece.span.textContent = text;
    this.pieces.push(piece);
    this.element.append(piece.span);
    this.paint(piece);
  }

  values(name) {
    return this.pieces.flatMap((p) => p.trace[name] || []);
  }

  show(name) {
    this.vector = name;
    this.pieces.forEach((p) => this.paint(p));
  }

  paint(piece) {
    const values = piece.trace[this.vector] || [];
    if (!values.length) {
      piece.span.style.background = "";
      piece.span.removeAttribute("title");
      delete piece.span.dataset.value;
      return;
    }
    const value = mean(values);  // a piece may hold more than one token
    piece.span.style.background = colour(value, scaleOf(this.vector));
    piece.span.dataset.value = value.toFixed(4);
    piece.span.title = `${this.vector}: ${values.map((v) => fmt(v)).join(", ")}`;
  }
}

// The meter panel: summary figures (also as data- attributes for tests and scripts), a per-token chart
// of the steered (and the plain) answer, and the colour legend.
export class Meter {
  constructor(root, chartBox, statsBox, legendBox) {
    Object.assign(this, { root, chartBox, statsBox, legendBox, plot: null });
  }

  update(name, threshold, series) {
    const main = series[0].values;
    const stats = { count: main.length, mean: mean(main), max: main.length ? Math.max(...main) : NaN };
    Object.assign(this.root.dataset, {
      vector: name || "", count: String(stats.count), mean: String(stats.mean), max: String(stats.max),
      values: JSON.stringify(main.map((v) => +v.toFixed(4))),
    });
    this.statsBox.replaceChildren(...(name ? [
      stat("tokens", String(stats.count)), stat("mean", fmt(stats.mean)), stat("max", fmt(stats.max)),
      stat("alert ≥", threshold == null ? "–" : fmt(threshold)),
    ] : [Object.assign(document.createElement("span"), { className: "muted", textContent: "no vector" })]));
    this.legend(name);
    this.chart(threshold, series);
  }

  legend(name) {
    const scale = scaleOf(name);
    const bar = document.createElement("div");
    bar.className = "legend-bar";
    const stops = [-scale, 0, scale].map((v) => colour(v, scale));
    bar.style.background = `linear-gradient(to right, ${stops.join(", ")})`;
    const labels = document.createElement("div");
    labels.className = "legend-labels";
    for (const v of [-scale, 0, scale]) {
      labels.append(Object.assign(document.createElement("span"), { textContent: fmt(v, 1) }));
    }
    this.legendBox.replaceChildren(bar, labels);
  }

  chart(threshold, series) {
    const length = Math.max(...series.map((s) => s.values.length), 0);
    const xs = Array.from({ length }, (_, i) => i + 1);
    const data = [xs, ...series.map((s) => xs.map((_, i) => s.values[i] ?? null))];
    const lines = series.map((s) => ({ label: s.label, stroke: s.colour, width: 2, points: { show: false } }));
    if (threshold != null) {
      data.push(xs.map(() => threshold));
      lines.push({ label: "alert threshold", stroke: "#dc2626", dash: [6, 4], width: 1, points: { show: false } });
    }
    if (this.plot) this.plot.destroy();
    const width = this.chartBox.clientWidth || 300;
    this.plot = new uPlot({
      width, height: 150, legend: { live: false }, cursor: { y: false },
      scales: { x: { time: false } },
      axes: [{ label: "token", size: 30, labelSize: 14 }, { size: 40 }],
      series: [{ label: "token" }, ...lines],
    }, data, this.chartBox);
  }
}

function stat(label, value) {
  const box = document.createElement("span");
  box.className = "stat";
  box.innerHTML = "<b></b><small></small>";
  box.firstChild.textContent = value;
  box.lastChild.textContent = label;
  return box;
}
