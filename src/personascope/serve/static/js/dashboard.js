// The dashboard: trait scores of recent traffic over time (one chart per vector, with its alert threshold),
// the last alerts with their conversations, the recent requests, the loaded vectors and a served run's report.

import { blobURL, getJSON } from "./api.js";
import { fmt } from "./meter.js";

const $ = (id) => document.getElementById(id);
const REFRESH_MS = 5000;

// `created` may be unix seconds or an ISO string; charts and labels want seconds.
export function seconds(created) {
  if (typeof created === "number") return created > 1e12 ? created / 1000 : created;
  const parsed = Date.parse(created);
  return Number.isFinite(parsed) ? parsed / 1000 : NaN;
}

const clock = (created) => new Date(seconds(created) * 1000).toLocaleTimeString();

function lastUser(record) {
  const users = (record.messages || []).filter((m) => m.role === "user");
  return users.length ? String(users[users.length - 1].content) : "";
}

function steerLabel(steer) {
  return (steer || []).map((s) => `${s.vector} ${s.coef > 0 ? "+" : ""}${fmt(Number(s.coef), 1)}`).join(", ");
}

function el(tag, props = {}, ...children) {
  const node = Object.assign(document.createElement(tag), props);
  node.append(...children.filter((c) => c != null));
  return node;
}

export class Dashboard {
  constructor(state) {
    this.state = state;       // {vectors, notify}
    this.plots = new Map();
    this.vectors = [];
    $("refresh").addEventListener("click", () => this.refresh());
    $("recent-limit").addEventListener("change", () => this.refresh());
    window.addEventListener("resize", () => {
      for (const { plot, target } of this.plots.values()) {
        plot.setSize({ width: target.clientWidth || 320, height: 200 });
      }
    });
  }

  start() {
    this.refresh();
    clearInterval(this.timer);
    this.timer = setInterval(() => this.refresh(), REFRESH_MS);
  }

  stop() {
    clearInterval(this.timer);
  }

  setVectors(vectors) {
    this.vectors = vectors;
    $("vectors-table").tBodies[0].replaceChildren(...vectors.map((v) => el("tr", { className: "vector-row" },
      ...[v.name, v.trait, v.model, v.layer, fmt(Number(v.best_coef)), fmt(Number(v.threshold)),
        v.auroc == null ? "–" : fmt(Number(v.auroc), 3), v.hidden_size]
        .map((cell) => el("td", { textContent: cell == null || Number.isNaN(cell) ? "–" : String(cell) })))));
  }

  // The run report lies behind the API key like the API, so it is fetched with it and shown from a blob.
  async showReport(url) {
    $("report-panel").hidden = !url;
    if (!url) return;
    try {
      const local = await blobURL(url);
      $("report-link").href = local;
      $("report-frame").src = local;
    } catch (error) {
      this.state.notify(`Could not load the run report: ${error.message}`);
    }
  }

  async refresh() {
    if (this.loading) return;
    this.loading = true;
    try {
      const recent = await getJSON(`/v1/persona/recent?limit=${$("recent-limit").value}`);
      const records = [...(recent.data || [])].sort((a, b) => seconds(a.created) - seconds(b.created));
      this.charts(records);
      this.requests(records);
      this.alerts(recent.alerts || []);
      $("refreshed").textContent = `updated ${new Date().toLocaleTimeString()}`;
    } catch (error) {
      this.state.notify(`Could not read recent traffic: ${error.message}`);
    } finally {
      this.loading = false;
    }
  }

  charts(records) {
    const box = $("charts");
    const names = this.vectors.map((v) => v.name);
    for (const name of [...this.plots.keys()]) {
      if (names.includes(name)) continue;
      const { plot, card } = this.plots.get(name);
      plot.destroy();
      card.remove();
      this.plots.delete(name);
    }
    if (!names.length) {
      box.replaceChildren(muted("No vectors loaded, so nothing is scored."));
      return;
    }
    for (const vector of this.vectors) {
      const scored = records.filter((r) => r.monitor && r.monitor[vector.name]);
      const xs = scored.map((r) => seconds(r.created));
      const threshold = vector.threshold == null ? null : Number(vector.threshold);
      const data = [xs, scored.map((r) => r.monitor[vector.name].response),
        scored.map((r) => r.monitor[vector.name].prompt), xs.map(() => threshold)];
      let entry = this.plots.get(vector.name);
      if (!entry) {
        const title = el("h3", { textContent: `${vector.name} — trait score per request` });
        const card = el("div", { className: "chart-card" }, title);
        card.dataset.vector = vector.name;
        card.dataset.testid = `chart-${vector.name}`;
        const target = el("div");
        card.append(target);
        box.append(card);
        const plot = new uPlot({
          width: Math.max(320, target.clientWidth || card.clientWidth - 24), height: 200, legend: { live: false },
          series: [{ label: "time" },
            { label: "answer", stroke: "#ea580c", width: 2, points: { size: 6, fill: "#ea580c" } },
            { label: "prompt", stroke: "#2563eb", width: 1, points: { size: 5, fill: "#2563eb" } },
            { label: "alert threshold", stroke: "#dc2626", dash: [6, 4], width: 1, points: { show: false } }],
          axes: [{ values: (u, splits) => splits.map((t) => new Date(t * 1000).toLocaleTimeString()) }, { size: 46 }],
        }, data, target);
        entry = { card, plot, target };
        this.plots.set(vector.name, entry);
        box.querySelectorAll(".muted").forEach((n) => n.remove());
      } else {
        entry.plot.setData(data);
      }
      entry.card.dataset.points = String(xs.length);
    }
  }

  requests(records) {
    const rows = [...records].reverse().map((r) => {
      const scores = Object.entries(r.monitor || {}).map(([name, m]) =>
        el("span", { className: m.alert ? "chip alert" : "chip", textContent: `${name} ${fmt(m.response)}` }));
      const row = el("details", { className: "request" },
        el("summary", {},
          el("span", { className: "time", textContent: clock(r.created) }),
          el("span", { className: "prompt", textContent: lastUser(r) }),
          r.steer && r.steer.length
            ? el("span", { className: "steer", textContent: `steered: ${steerLabel(r.steer)}` }) : null,
          ...scores),
        conversation(r));
      row.dataset.testid = "recent-row";
      row.dataset.id = r.id;
      return row;
    });
    $("recent").replaceChildren(...(rows.length ? rows : [muted("No requests yet.")]));
  }

  alerts(alerts) {
    const items = [...alerts].sort((a, b) => seconds(b.created) - seconds(a.created)).map((a) => {
      const alerting = Object.entries(a.monitor || {}).filter(([, m]) => m.alert);
      const byName = Object.fromEntries(this.vectors.map((v) => [v.name, v]));
      const card = el("details", { className: "alert-card" },
        el("summary", {},
          el("span", { className: "time", textContent: clock(a.created) }),
          ...alerting.map(([name, m]) => el("span", { className: "chip alert",
            textContent: `${name} ${fmt(m.response)} ≥ ${fmt(Number(byName[name]?.threshold))}` })),
          el("span", { className: "prompt", textContent: lastUser(a) })),
        conversation(a));
      card.dataset.testid = "alert";
      card.dataset.id = a.id;
      return card;
    });
    $("alerts").replaceChildren(...(items.length ? items : [muted("No alerts.")]));
  }
}

function muted(text) {
  return el("p", { className: "muted", textContent: text });
}

function conversation(record) {
  const box = el("div", { className: "conversation" });
  const turns = [...(record.messages || [])];
  if (record.answer != null) turns.push({ role: "assistant", content: record.answer });
  for (const m of turns) box.append(el("div", { className: `bubble ${m.role}`, textContent: String(m.content) }));
  return box;
}
