// Task statuses: a word and a colour for each (never colour alone).

export const STATUSES = {
  queued: { label: "Queued", hint: "waiting for a launch slot" },
  preparing: { label: "Preparing", hint: "loading the model and the data" },
  training: { label: "Training", hint: "training steps are running" },
  completed: { label: "Completed", hint: "the adapter is ready" },
  paused: { label: "Paused", hint: "stopped after a checkpoint; can resume" },
  failed: { label: "Failed", hint: "stopped with an error" },
  cancelled: { label: "Cancelled", hint: "stopped on request" },
  interrupted: { label: "Interrupted", hint: "the process died; waiting to resume from a checkpoint" },
};

/** Statuses in which a training process may be running. */
export const RUNNING = new Set(["preparing", "training"]);
/** Statuses a task never leaves: the stream ends with them. */
export const FINAL = new Set(["completed", "failed", "cancelled"]);

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
