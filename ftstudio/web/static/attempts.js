// A task's attempts, oldest first: when each started and ended, how long it ran, why it
// ended and the step it resumed from; the current one marked. Drawn from the task's
// `attempts` (every task event carries them); the status changes behind them, with
// their reasons, come from GET /api/tasks/{id}/history when the list is opened.

import { api, taskUrl } from "./api.js";
import { h, isNum, fmtInt, fmtDuration, fmtTime, isoTime } from "./dom.js";
import { STATUSES, RUNNING, isPausing } from "./status.js";

export class AttemptsTimeline {
  constructor(taskId) {
    this.taskId = taskId;
    this.shown = "";
    this.status = null;
    this.tbody = h("tbody", { id: "attempts-rows" });
    this.empty = h("p", { class: "muted" }, "No attempt has started yet.");
    this.table = h(
      "table",
      { class: "attempts", id: "attempts" },
      h("caption", { class: "visually-hidden" }, "Attempts, oldest first"),
      h("thead", {}, h("tr", {}, ["Attempt", "Started", "Ended", "Ran for", "Resumed from", "Ended because"].map((c) => h("th", { scope: "col" }, c)))),
      this.tbody,
    );
    this.transitions = h("ol", { class: "transitions", id: "transitions" });
    this.history = h(
      "details",
      { class: "history", ontoggle: () => this.history.open && this.loadHistory() },
      h("summary", {}, "Every status change, with why"),
      this.transitions,
    );
    this.el = h("div", { class: "attempts-box" }, this.empty, h("div", { class: "table-wrap" }, this.table), this.history);
  }

  update(t) {
    const key = JSON.stringify([t.status, t.phase, t.attempt, t.attempts, Math.floor((t.elapsed_s || 0) / 5)]);
    if (key === this.shown) return;
    this.shown = key;
    const statusChanged = this.status !== null && this.status !== t.status;
    this.status = t.status;
    const attempts = [...(t.attempts || [])].sort((a, b) => a.attempt - b.attempt);
    const rows = attempts.map((a) => this.row(a, t));
    const last = attempts.length ? attempts[attempts.length - 1].attempt : 0;
    if (isNum(t.attempt) && t.attempt > last && attempts.length) {
      // Retried or extended, not launched yet: the next attempt waits in the queue.
      const word = t.status === "paused" ? "held in the queue" : "queued";
      rows.push(h("tr", { class: "pending", dataset: { attempt: t.attempt, state: "queued" } }, h("th", { scope: "row" }, `Attempt ${t.attempt}`), h("td", { colspan: 5, class: "muted" }, `${word}, not started yet`)));
    }
    this.tbody.replaceChildren(...rows);
    this.table.parentElement.hidden = rows.length === 0;
    this.empty.hidden = rows.length > 0;
    this.history.hidden = rows.length === 0;
    if (statusChanged && this.history.open) this.loadHistory();
  }

  row(a, t) {
    const current = a.attempt === t.attempt && !isNum(a.ended_at);
    let state = "ended";
    let word = a.end_reason || "–";
    if (current) {
      state = t.frozen || t.phase === "frozen" ? "frozen" : RUNNING.has(t.status) ? "running" : t.status;
      word = state === "running" ? (isPausing(t) ? "running (pausing: saving a checkpoint)" : "running") : state === "frozen" ? "frozen (still holds its memory)" : STATUSES[t.status]?.label.toLowerCase() || t.status;
    }
    const end = isNum(a.ended_at) ? a.ended_at : current ? Date.now() / 1000 : null;
    const ran = isNum(a.started_at) && isNum(end) ? fmtDuration(end - a.started_at) : "–";
    const time = (ts) => (isNum(ts) ? h("time", { datetime: isoTime(ts), title: new Date(ts * 1000).toLocaleString() }, fmtClock(ts)) : "–");
    return h(
      "tr",
      { class: current ? "current" : "", dataset: { attempt: a.attempt, state } },
      h("th", { scope: "row" }, `Attempt ${a.attempt}`, current ? h("span", { class: `now st-${state === "running" ? "training" : "paused"}` }, ` ● ${state}`) : null),
      h("td", {}, time(a.started_at)),
      h("td", {}, isNum(a.ended_at) ? time(a.ended_at) : "–"),
      h("td", { class: "num" }, ran),
      h("td", {}, isNum(a.resumed_from_step) && a.resumed_from_step > 0 ? `step ${fmtInt(a.resumed_from_step)}` : "the start"),
      h("td", { class: "why" }, CAUSES[a.end_cause] ? h("span", { class: `cause cause-${a.end_cause}`, title: CAUSES[a.end_cause][1] }, CAUSES[a.end_cause][0]) : null, word),
    );
  }

  async loadHistory() {
    try {
      const r = await api(taskUrl(this.taskId, "/history"));
      this.transitions.replaceChildren(
        ...(r.transitions || []).map((x) =>
          h(
            "li",
            {},
            h("time", { datetime: isoTime(x.ts) }, fmtClock(x.ts)),
            ` ${x.src ? `${STATUSES[x.src]?.label || x.src} → ` : ""}${STATUSES[x.dst]?.label || x.dst}`,
            x.reason ? h("span", { class: "muted" }, `: ${x.reason}`) : null,
          ),
        ),
      );
    } catch (err) {
      this.transitions.replaceChildren(h("li", { class: "error-text" }, `Could not read the history: ${err.message}`));
    }
  }
}

/** Who stopped an interrupted attempt: the tag shown before its reason, and what it means for the run. */
const CAUSES = {
  machine: ["by the machine", "a reboot, a shutdown, a preemption or a killed process: the task resumes by itself, and this never counts against resume.max_restarts"],
  run: ["by the run", "the training process itself crashed or was killed (often out of memory): this counts against resume.max_restarts"],
};

/** To the second on the same day (attempts can be short), as fmtTime does otherwise. */
function fmtClock(ts) {
  const d = new Date(ts * 1000);
  if (d.toDateString() !== new Date().toDateString()) return fmtTime(ts);
  return d.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", second: "2-digit" });
}
