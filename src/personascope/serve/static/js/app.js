// Start-up: tabs (/ = playground, /dashboard = dashboard), the loaded vectors, the model's name, notices.

import { forgetKey, getJSON } from "./api.js";
import { Dashboard } from "./dashboard.js";
import { Playground } from "./playground.js";

const $ = (id) => document.getElementById(id);

function notify(message) {
  const box = $("notice");
  box.textContent = message;
  box.hidden = !message;
}

const state = { vectors: [], model: null, notify };
const playground = new Playground(state);
const dashboard = new Dashboard(state);

function show(tab) {
  for (const page of ["playground", "dashboard"]) $(page).hidden = page !== tab;
  document.querySelectorAll(".tab").forEach((a) => a.classList.toggle("active", a.dataset.tab === tab));
  if (tab === "dashboard") dashboard.start(); else dashboard.stop();
  if (tab === "playground") playground.showMeter();
}

const tabOf = (path) => (path.replace(/\/+$/, "").endsWith("/dashboard") ? "dashboard" : "playground");

document.querySelectorAll(".tab").forEach((a) => a.addEventListener("click", (e) => {
  e.preventDefault();
  history.pushState({}, "", a.getAttribute("href"));
  show(a.dataset.tab);
}));
window.addEventListener("popstate", () => show(tabOf(location.pathname)));

$("forget-key").addEventListener("click", () => { forgetKey(); $("forget-key").hidden = true; });

async function start() {
  try {
    const vectors = (await getJSON("/v1/persona/vectors")).data || [];
    state.vectors = vectors;
    playground.setVectors(vectors);
    dashboard.setVectors(vectors);
    const models = (await getJSON("/v1/models")).data || [];
    state.model = models.length ? models[0].id : null;
    $("model-name").textContent = state.model ? `model: ${state.model}` : "";
    const config = await getJSON("/web/config");
    dashboard.showReport(config.report);
    notify("");
  } catch (error) {
    notify(`Could not reach the server's API: ${error.message}`);
  }
  show(tabOf(location.pathname));
  document.body.dataset.ready = "true";
}

start();
