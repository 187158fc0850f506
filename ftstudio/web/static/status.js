// Task statuses: a word and a colour for each (never colour alone). The words, which statuses
// are final or may have a process, and the actions each allows are the lifecycle's
// (lifecycle.js, generated from ftstudio/lifecycle.py); only the glyphs and colours are the page's.

import { LIFECYCLE } from "./lifecycle.js";

/** status -> { status, label, hint, final, has_process, actions } */
export const STATUSES = Object.fromEntries(LIFECYCLE.statuses.map((s) => [s.status, s]));
/** Statuses in which a training process may be running. */
export const RUNNING = new Set(LIFECYCLE.statuses.filter((s) => s.has_process).map((s) => s.status));
/** Statuses a task never leaves: the stream ends with them. */
export const FINAL = new Set(LIFECYCLE.statuses.filter((s) => s.final).map((s) => s.status));
/** action -> { action, label, hint, pending, destructive }, in the order the page shows them. */
export const ACTIONS = Object.fromEntries(LIFECYCLE.actions.map((a) => [a.action, a]));

/** A pause was asked for and the trainer is saving its checkpoint (its phase says so until a status event of the trainer's). */
export const isPausing = (t) => RUNNING.has(t.status) && (t.phase === "pausing" || Number.isFinite(t.pause_requested_at));

const GLYPHS = {
  queued: "○",
  preparing: "◔",
  training: "▶",
  completed: "✓",
  paused: "❚❚",
  failed: "✕",
  cancelled: "⊘",
  interrupted: "!",
};

export function statusBadge(status) {
  const el = document.createElement("span");
  setBadge(el, status);
  return el;
}

export function setBadge(el, status) {
  const info = STATUSES[status] || { label: status || "unknown", hint: "" };
  if (el.dataset.status === status) return;
  el.className = `badge st-${status}`;
  el.dataset.status = status;
  el.title = info.hint;
  const glyph = document.createElement("span");
  glyph.className = "glyph";
  glyph.setAttribute("aria-hidden", "true");
  glyph.textContent = GLYPHS[status] || "?";
  el.replaceChildren(glyph, info.label);
}
