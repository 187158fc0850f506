// The time per epoch on the New fine-tune form: the measurement kept for the form's settings
// (POST /api/tasks/timing), or a button that times a few real training steps here
// (POST /api/tasks/timing/measure; ?again=true to measure a kept one anew), followed until it ends
// (GET /api/tasks/timing/{key}).
// A fine-tune started with settings that were timed records the estimate, and its page later
// shows how the run compared.

import { api, ApiError } from "./api.js";
import { h } from "./dom.js";

const POLL_MS = 1500;

/** `payload()` gives the form's submit body; `gone()` says the form was left. */
export function timingBox(payload, gone) {
  const text = h("span", { id: "time-estimate-text" }, "Time per epoch: checking…");
  const button = h("button", { type: "button", id: "time-estimate-measure", class: "secondary", hidden: true, onclick: () => measure() }, "Measure it");
  const el = h("p", { id: "time-estimate", class: "time-estimate muted", role: "status", "aria-live": "polite" }, text, " ", button);
  let seq = 0;
  let timer = 0;
  let kept = false; // a measurement is shown: the button measures anew

  function say(found) {
    button.hidden = true;
    kept = found.state === "done";
    el.classList.remove("warn");
    if (found.state === "done") {
      text.textContent = `${found.line.charAt(0).toUpperCase()}${found.line.slice(1)}.`;
      button.textContent = "Measure again";
      button.hidden = false;
    } else if (found.state === "running") {
      text.textContent = "Time per epoch: timing a few training steps here…";
    } else if (found.state === "failed") {
      text.textContent = `Time per epoch: ${found.message}.`;
      el.classList.add("warn");
      button.textContent = "Try again";
      button.hidden = false;
    } else if (found.state === "unsupported") {
      text.textContent = `Time per epoch: ${found.message}.`;
    } else {
      text.textContent = `Time per epoch: not measured for these settings yet (it takes ${found.steps || "a few"} real training steps here).`;
      button.textContent = "Measure it";
      button.hidden = false;
    }
  }

  async function ask(url, init, { measuring = false } = {}) {
    const mine = ++seq;
    clearTimeout(timer);
    let found;
    try {
      found = await api(url, init);
    } catch (err) {
      if (!(err instanceof ApiError)) throw err;
      if (mine !== seq || gone()) return;
      if (measuring) {
        // Refused to start (another measurement runs: 409; or the run itself would be refused): say why, and
        // leave the button to try again.
        text.textContent = `Time per epoch: ${err.message}`;
        button.textContent = "Try again";
        button.hidden = false;
      } else {
        button.hidden = true;
        text.textContent = "No time estimate until the settings are valid.";
      }
      return;
    }
    if (mine !== seq || gone()) return; // the settings changed meanwhile: a newer answer is on its way
    say(found);
    if (found.state === "running") timer = setTimeout(() => ask(`/api/tasks/timing/${found.key}`), POLL_MS);
  }

  return {
    el,
    refresh: () => ask("/api/tasks/timing", { method: "POST", json: payload() }),
    measure,
  };

  function measure() {
    button.hidden = true;
    text.textContent = "Time per epoch: starting a few training steps here…";
    const url = kept ? "/api/tasks/timing/measure?again=true" : "/api/tasks/timing/measure";
    return ask(url, { method: "POST", json: payload() }, { measuring: true });
  }
}
