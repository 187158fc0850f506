// The queue in words: where a queued task stands and why (from the task's `queue`),
// and the queue panel of the task list: what runs on which slot or GPU, what waits
// and for what (GET /api/queue).

import { api } from "./api.js";
import { h, setText, fmtInt } from "./dom.js";
import { STATUSES } from "./status.js";

/** "#2 in the queue", or "starting" when its slot or GPUs are free; "" when not queued. */
export function queuePlace(q) {
  if (!q) return "";
  return q.position > 0 ? `#${fmtInt(q.position)} in the queue` : "starting";
}

/** The whole sentence as nodes: "#2 in the queue — waiting behind task <link> for a training slot". */
export function queueSentence(q, names) {
  if (!q) return [];
  if (!(q.position > 0)) return ["Starting: its slot or GPUs are free, the training process starts in a moment."];
  return [`${queuePlace(q)} — `, ...reasonNodes(q.reason, q.blocked_by, names)];
}

/** The studio's reason as text, each blocking task's id in it a link to that task (named when the name is known). */
export function reasonNodes(reason, blockedBy, names = new Map()) {
  const text = String(reason || "");
  const ids = (blockedBy || []).filter((id) => typeof id === "string" && id && text.includes(id));
  if (!ids.length) return [text];
  const out = [];
  let rest = text;
  while (rest) {
    let at = -1;
    let id = null;
    for (const cand of ids) {
      const i = rest.indexOf(cand);
      if (i >= 0 && (at < 0 || i < at)) [at, id] = [i, cand];
    }
    if (at < 0) break;
    out.push(rest.slice(0, at), taskLink(id, names.get(id)));
    rest = rest.slice(at + id.length);
  }
  out.push(rest);
  return out;
}

function taskLink(id, name) {
  return h("a", { href: `#/tasks/${encodeURIComponent(id)}`, title: name ? id : null }, name ? `“${name}”` : id);
}

/** "slot:0" -> "slot 0", "gpu:1" -> "GPU 1". */
export function fmtResource(r) {
  const [kind, n] = String(r).split(":");
  return kind === "gpu" ? `GPU ${n}` : n != null ? `${kind} ${n}` : String(r);
}

/** The task list's queue panel; `update()` asks the studio again (the list calls it with each refresh). */
export class QueuePanel {
  constructor() {
    this.summary = h("span", { class: "muted", id: "queue-summary" });
    this.running = h("ul", { id: "queue-running", class: "queue-list" });
    this.waiting = h("ol", { id: "queue-waiting", class: "queue-list" });
    this.error = h("p", { class: "error-text", hidden: true });
    this.el = h(
      "section",
      { class: "queue-panel", id: "queue-panel", "aria-labelledby": "queue-title" },
      h("div", { class: "queue-head" }, h("h2", { id: "queue-title" }, "Queue"), this.summary),
      h(
        "div",
        { class: "queue-cols" },
        h("div", {}, h("h3", {}, "Running"), this.running),
        h("div", {}, h("h3", {}, "Waiting"), this.waiting),
      ),
      this.error,
    );
    this.shown = "";
  }

  async update() {
    try {
      this.render(await api("/api/queue"));
      this.error.hidden = true;
    } catch (err) {
      setText(this.error, `Could not read the queue: ${err.message}`);
      this.error.hidden = false;
    }
  }

  render(q) {
    const key = JSON.stringify(q);
    if (key === this.shown) return;
    this.shown = key;
    const running = q.running || [];
    const waiting = q.waiting || [];
    const names = new Map([...running, ...waiting].map((t) => [t.id, t.name]));
    const slots = Number(q.slots) || 0;
    const gpus = q.gpus || [];
    const busy = running.filter((t) => (t.resources || []).some((r) => String(r).startsWith("slot:"))).length;
    setText(
      this.summary,
      `${fmtInt(slots)} training slot${slots === 1 ? "" : "s"} (${fmtInt(Math.max(0, slots - busy))} free)` +
        (gpus.length ? ` · GPU${gpus.length === 1 ? "" : "s"} ${gpus.join(", ")}` : " · no GPU"),
    );
    const link = (t) => h("a", { href: `#/tasks/${encodeURIComponent(t.id)}` }, t.name || t.id);
    this.running.replaceChildren(
      ...(running.length
        ? running.map((t) =>
            h(
              "li",
              { dataset: { id: t.id } },
              h("span", { class: "lease" }, (t.resources || []).map(fmtResource).join(", ") || "no lease"),
              " ",
              link(t),
              h("span", { class: "muted" }, ` ${STATUSES[t.status]?.label.toLowerCase() || t.status}`),
            ),
          )
        : [h("li", { class: "muted" }, "Nothing is training.")]),
      // A chat worker holds no lease: it is shown beside the tasks because it uses the machine too.
      ...(q.chats || []).map((c) =>
        h(
          "li",
          { class: "queue-chat", dataset: { pid: String(c.pid) } },
          h("span", { class: "lease" }, "chat"),
          " ",
          c.task ? link({ id: c.task, name: names.get(c.task) || `task ${c.task}` }) : "a chat",
          h("span", { class: "muted" }, ` on ${c.device}`),
        ),
      ),
      // So is an export job (GGUF): one at a time on the machine, at a lower priority than training.
      ...(q.exports || []).map((e) =>
        h(
          "li",
          { class: "queue-export", dataset: { task: e.task, job: e.job } },
          h("span", { class: "lease" }, "export"),
          " ",
          link({ id: e.task, name: names.get(e.task) || `task ${e.task}` }),
          h("span", { class: "muted" }, ` ${e.quant}, ${e.status}: ${e.progress || ""}`),
        ),
      ),
    );
    this.waiting.replaceChildren(
      ...(waiting.length
        ? waiting.map((t) =>
            h(
              "li",
              { dataset: { id: t.id } },
              h("span", { class: "lease" }, `#${fmtInt(t.position)}`),
              " ",
              link(t),
              t.priority ? h("span", { class: "muted" }, ` priority ${t.priority}`) : null,
              h("span", { class: "muted" }, " — ", ...reasonNodes(t.reason, t.blocked_by, names)),
            ),
          )
        : [h("li", { class: "muted" }, "Nothing waits.")]),
    );
  }
}
