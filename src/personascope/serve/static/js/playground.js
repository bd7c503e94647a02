// The playground: chat with the served model, steer the next answer with one slider per vector, watch the
// prompt projection and the per-token trait meter, and compare with the plain answer on request.

import { streamChat } from "./api.js";
import { Meter, TokenView, colour, fmt, noteScale, scaleOf } from "./meter.js";

const $ = (id) => document.getElementById(id);

// Slider range: twice the vector's best coefficient, or ±8 when the vector has none.
export function sliderMax(vector) {
  const best = Math.abs(Number(vector.best_coef) || 0);
  return best > 0 ? 2 * best : 8;
}

// A slider's coefficient: rounded to its step, and exactly 0 (off) near the middle, whatever floating point
// made of min + k·step.
export function coefOf(input) {
  const step = Number(input.step);
  const value = Math.round(Number(input.value) / step) * step;
  return Math.abs(value) < step / 2 ? 0 : Number(value.toFixed(4));
}

export class Playground {
  constructor(state) {
    this.state = state;           // {vectors, model, notify}
    this.history = [];            // finished turns, as chat messages
    this.vectors = [];
    this.views = { steered: null, plain: null };
    this.meter = new Meter($("trait-meter"), $("meter-chart"), $("meter-stats"), $("meter-legend"));
    $("composer").addEventListener("submit", (e) => { e.preventDefault(); this.send(); });
    $("prompt-input").addEventListener("keydown", (e) => {
      if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); this.send(); }
    });
    $("clear").addEventListener("click", () => this.clear());
    $("meter-vector").addEventListener("change", () => this.showMeter());
    window.addEventListener("resize", () => this.showMeter());
  }

  setVectors(vectors) {
    this.vectors = vectors;
    const box = $("sliders");
    box.replaceChildren();
    if (!vectors.length) {
      box.innerHTML = '<p class="muted">No vectors loaded: start the server with <code>--vector FILE</code>.</p>';
    }
    for (const v of vectors) box.append(this.slider(v));
    const select = $("meter-vector");
    select.replaceChildren(...vectors.map((v) => new Option(`${v.name} (layer ${v.layer})`, v.name)));
    this.showMeter();
  }

  slider(vector) {
    const max = sliderMax(vector);
    const row = document.createElement("div");
    row.className = "slider";
    row.innerHTML = `<div class="slider-head"><label></label><output></output></div>
      <input type="range"><div class="slider-scale"><span></span><span>0 = off</span><span></span></div>`;
    const [label, output, input] = ["label", "output", "input"].map((tag) => row.querySelector(tag));
    const id = `coef-${vector.name}`;
    Object.assign(input, { id, min: -max, max, step: max / 50, value: 0, title: "double-click: back to 0" });
    input.dataset.testid = id;
    input.dataset.vector = vector.name;
    label.htmlFor = id;
    label.textContent = vector.name;
    row.querySelectorAll(".slider-scale span")[0].textContent = fmt(-max, 1);
    row.querySelectorAll(".slider-scale span")[2].textContent = fmt(max, 1);
    const show = () => {
      const coef = coefOf(input);
      output.textContent = coef === 0 ? "off" : (coef > 0 ? "+" : "") + fmt(coef);
      row.classList.toggle("active", coef !== 0);
    };
    input.addEventListener("input", show);
    input.addEventListener("dblclick", () => { input.value = 0; show(); });
    show();
    return row;
  }

  steering() {
    return [...document.querySelectorAll("#sliders input[type=range]")]
      .map((input) => ({ vector: input.dataset.vector, coef: coefOf(input) }))
      .filter((s) => s.coef !== 0);
  }

  clear() {
    this.history = [];
    $("transcript").replaceChildren();
    this.views = { steered: new TokenView($("answer")), plain: null };
    $("answer-scores").replaceChildren();
    $("plain-card").hidden = true;
    $("prompt-projection").innerHTML = '<span class="muted">no prompt yet</span>';
    this.showMeter();
  }

  async send() {
    const input = $("prompt-input");
    const text = input.value.trim();
    if (!text || this.busy) return;
    this.busy = true;
    $("send").disabled = true;
    this.archiveLastTurn();
    const messages = [...this.history, { role: "user", content: text }];
    const steer = this.steering();
    const compare = $("compare").checked;
    input.value = "";
    this.pending = { user: text, answer: "" };
    bubble($("transcript"), "user", text, "pending-user");
    const steering = steer.map((s) => `${s.vector} ${fmt(s.coef, 1)}`).join(", ");
    $("answer-title").textContent = steer.length ? `Steered (${steering})` : "Answer";
    $("prompt-projection").innerHTML = '<span class="muted">reading the prompt…</span>';
    $("plain-card").hidden = !compare;
    this.views = { steered: new TokenView($("answer")), plain: compare ? new TokenView($("answer-plain")) : null };
    $("answer-scores").replaceChildren();
    $("answer-plain-scores").replaceChildren();
    $("answer").classList.add("streaming");
    try {
      this.pending.answer = await this.stream(messages, steer, this.views.steered, $("answer-scores"), true);
      if (compare) {
        $("answer-plain").classList.add("streaming");
        await this.stream(messages, [], this.views.plain, $("answer-plain-scores"), false);
      }
    } catch (error) {
      this.state.notify(`The request failed: ${error.message}`);
    } finally {
      $("answer").classList.remove("streaming");
      $("answer-plain").classList.remove("streaming");
      this.busy = false;
      $("send").disabled = false;
      $("answer").dataset.done = "true";
    }
  }

  // Stream one answer into `view`; the prompt projection is shown once, from the steered request.
  async stream(messages, steer, view, scoresBox, showPrompt) {
    let text = "";
    delete view.element.dataset.done;
    view.show($("meter-vector").value);
    const body = {
      model: this.state.model || "personascope", messages,
      max_tokens: Number($("max-tokens").value) || 64, temperature: Number($("temperature").value),
      persona: { steer, monitor: true, trace: true },
    };
    await streamChat(body, (chunk) => {
      const persona = chunk.persona || {};
      if (persona.prompt && showPrompt) this.showPrompt(persona.prompt);
      const content = chunk.choices?.[0]?.delta?.content;
      if (content || persona.trace) {
        for (const [name, values] of Object.entries(persona.trace || {})) noteScale(name, values, this.threshold(name));
        view.add(content || "", persona.trace);
        text += content || "";
        this.scheduleMeter();
      }
      if (persona.monitor) showScores(scoresBox, persona.monitor);
    });
    return text;
  }

  threshold(name) {
    const v = this.vectors.find((x) => x.name === name);
    return v && v.threshold != null ? Number(v.threshold) : null;
  }

  showPrompt(projection) {
    const box = $("prompt-projection");
    box.replaceChildren(...Object.entries(projection).map(([name, value]) => {
      const chip = document.createElement("span");
      chip.className = "chip";
      chip.dataset.vector = name;
      chip.dataset.value = String(value);
      const threshold = this.threshold(name);
      if (threshold != null && value >= threshold) chip.classList.add("alert");
      chip.style.borderColor = colour(value, scaleOf(name) || Math.abs(value));
      chip.textContent = `${name} ${fmt(value)}`;
      return chip;
    }));
  }

  scheduleMeter() {
    if (this.frame) return;
    this.frame = requestAnimationFrame(() => { this.frame = null; this.showMeter(); });
  }

  showMeter() {
    const name = $("meter-vector").value || null;
    const series = [];
    for (const [key, label, stroke] of [["steered", "this answer", "#ea580c"], ["plain", "plain answer", "#64748b"]]) {
      const view = this.views[key];
      if (!view) continue;
      view.show(name);
      series.push({ label, colour: stroke, values: view.values(name) });
    }
    if (!series.length) series.push({ label: "this answer", colour: "#ea580c", values: [] });
    this.meter.update(name, name ? this.threshold(name) : null, series);
  }

  // The previous exchange moves from the answer card into the transcript, and into the chat history.
  archiveLastTurn() {
    const pending = document.querySelector("#transcript .pending-user");
    if (!pending || !this.pending) return;
    pending.classList.remove("pending-user");
    this.history.push({ role: "user", content: this.pending.user });
    if (this.pending.answer) {
      this.history.push({ role: "assistant", content: this.pending.answer });
      bubble($("transcript"), "assistant", this.pending.answer);
    }
    this.pending = null;
  }
}

function bubble(box, role, text, extra = "") {
  const div = document.createElement("div");
  div.className = `bubble ${role} ${extra}`.trim();
  div.textContent = text;
  box.append(div);
  box.scrollTop = box.scrollHeight;
}

// The end-of-answer monitor figures: one chip per vector, prompt → response, marked when it alerts.
export function showScores(box, monitor) {
  box.replaceChildren(...Object.entries(monitor).map(([name, m]) => {
    const chip = document.createElement("span");
    chip.className = m.alert ? "chip alert" : "chip";
    chip.dataset.vector = name;
    chip.dataset.response = String(m.response);
    chip.textContent = `${name}: prompt ${fmt(m.prompt)} · answer ${fmt(m.response)}${m.alert ? " · ALERT" : ""}`;
    return chip;
  }));
}
