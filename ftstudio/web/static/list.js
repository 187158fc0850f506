// The task list: newest first, filter by status, paged; refreshed every few
// seconds by updating rows in place (a page of rows, never the whole history).
// Above it the queue panel: what trains on which slot or GPU, what waits and why.
// A box beside each name picks it for comparing (#/compare); the picks outlive paging
// and filtering, for as long as the page is open.

import { api } from "./api.js";
import { h, setText, fmtOf, fmtEpoch, fmtLoss, fmtDuration, fmtTime, isoTime, isNum, fmtInt, progressBar } from "./dom.js";
import { STATUSES, RUNNING, statusBadge, setBadge, isPausing } from "./status.js";
import { QueuePanel, queuePlace, reasonNodes } from "./queue.js";
import { MAX_COMPARED } from "./compare.js";

const PAGE_SIZE = 50;
const REFRESH_MS = 3000;
const picked = new Set();

export function mountList(root, params) {
  const status = params.get("status") || "";
  const page = Math.max(1, Number(params.get("page")) || 1);
  let timer = null;
  let destroyed = false;
  const rows = new Map();
  const queue = new QueuePanel();

  const filter = h(
    "select",
    { id: "status-filter", onchange: () => go(filter.value, 1) },
    h("option", { value: "" }, "All statuses"),
    Object.entries(STATUSES).map(([value, info]) => h("option", { value, selected: value === status }, info.label)),
  );
  const count = h("p", { class: "muted", id: "task-count", "aria-live": "polite" }, "Loading…");
  const error = h("p", { class: "error-text", role: "alert", hidden: true });
  const tbody = h("tbody");
  const table = h(
    "table",
    { class: "tasks", id: "task-table" },
    h("caption", { class: "visually-hidden" }, "Fine-tunes, newest first"),
    h(
      "thead",
      {},
      h(
        "tr",
        {},
        ["Name", "Model", "Status", "Progress", "Step", "Epoch", "Loss", "Elapsed", "ETA", "Created"].map((c) => h("th", { scope: "col" }, c)),
      ),
    ),
    tbody,
  );
  const empty = h("p", { class: "empty", hidden: true }, "No fine-tunes here yet. ", h("a", { href: "#/new" }, "Start one"), ".");
  const prev = h("button", { type: "button", class: "secondary", onclick: () => go(status, page - 1) }, "← Newer");
  const next = h("button", { type: "button", class: "secondary", onclick: () => go(status, page + 1) }, "Older →");
  const pageInfo = h("span", { class: "muted" });
  const pager = h("nav", { class: "pager", "aria-label": "Pages" }, prev, pageInfo, next);
  const compare = h("button", { type: "button", id: "compare-button", onclick: () => compareNow() });
  const clear = h("button", { type: "button", class: "secondary", id: "compare-clear", onclick: () => clearPicks() }, "Clear");
  const picks = h("div", { class: "picks", role: "group", "aria-label": "Compare" }, compare, clear);

  root.append(
    h(
      "section",
      { "aria-labelledby": "list-title" },
      h(
        "div",
        { class: "title-row" },
        h("h1", { id: "list-title", tabindex: "-1" }, "Fine-tunes"),
        h("a", { class: "button", href: "#/new" }, "New fine-tune"),
      ),
      h("div", { class: "toolbar" }, h("label", { for: "status-filter" }, "Status "), filter, picks, count),
      queue.el,
      error,
      h("div", { class: "table-wrap" }, table),
      empty,
      pager,
    ),
  );

  function showPicks() {
    const n = picked.size;
    setText(compare, n >= 2 ? `Compare ${n} selected` : n === 1 ? "Compare: pick one more" : "Compare: pick two or more");
    compare.disabled = n < 2 || n > MAX_COMPARED;
    compare.className = compare.disabled ? "secondary" : "";
    compare.title = n > MAX_COMPARED ? `At most ${MAX_COMPARED} at a time` : "";
    clear.hidden = n === 0;
  }

  function pick(id, on) {
    if (on) picked.add(id);
    else picked.delete(id);
    showPicks();
  }

  function clearPicks() {
    picked.clear();
    for (const row of rows.values()) row.c.pick.checked = false;
    showPicks();
  }

  function compareNow() {
    if (picked.size < 2) return;
    location.hash = `#/compare?tasks=${[...picked].map(encodeURIComponent).join(",")}`;
  }

  function go(st, pg) {
    const q = new URLSearchParams();
    if (st) q.set("status", st);
    if (pg > 1) q.set("page", String(pg));
    const qs = q.toString();
    location.hash = `#/tasks${qs ? `?${qs}` : ""}`;
  }

  async function load() {
    clearTimeout(timer);
    if (destroyed) return;
    if (!document.hidden) {
      try {
        const q = new URLSearchParams({ limit: String(PAGE_SIZE), offset: String((page - 1) * PAGE_SIZE) });
        if (status) q.set("status", status);
        const [r] = await Promise.all([api(`/api/tasks?${q}`), queue.update()]);
        if (destroyed) return;
        error.hidden = true;
        render(r.tasks || [], r.total ?? (r.tasks || []).length);
      } catch (err) {
        if (destroyed) return;
        error.textContent = err.message;
        error.hidden = false;
      }
    }
    timer = setTimeout(load, REFRESH_MS);
  }

  function render(tasks, total) {
    const first = (page - 1) * PAGE_SIZE;
    setText(
      count,
      total ? `${fmtInt(first + 1)}–${fmtInt(first + tasks.length)} of ${fmtInt(total)}${status ? ` ${STATUSES[status]?.label.toLowerCase() || status}` : ""}` : "",
    );
    empty.hidden = tasks.length > 0;
    table.hidden = tasks.length === 0;
    const pages = Math.max(1, Math.ceil(total / PAGE_SIZE));
    setText(pageInfo, `Page ${page} of ${pages}`);
    prev.disabled = page <= 1;
    next.disabled = page >= pages;
    pager.hidden = pages <= 1 && page <= 1;

    const seen = new Set();
    const names = new Map(tasks.map((t) => [t.id, t.name]));
    let before = null;
    for (let i = tasks.length - 1; i >= 0; i--) {
      const t = tasks[i];
      seen.add(t.id);
      let row = rows.get(t.id);
      if (!row) {
        row = makeRow(t, pick);
        rows.set(t.id, row);
      }
      updateRow(row, t, names);
      if (row.tr.nextSibling !== before || row.tr.parentNode !== tbody) tbody.insertBefore(row.tr, before);
      before = row.tr;
    }
    for (const [id, row] of rows) {
      if (!seen.has(id)) {
        row.tr.remove();
        rows.delete(id);
      }
    }
  }

  showPicks();
  load();
  return {
    destroy() {
      destroyed = true;
      clearTimeout(timer);
    },
    refresh: load,
  };
}

function makeRow(t, pick) {
  const c = {};
  const cell = (key, ...kids) => (c[key] = h("td", { class: `c-${key}` }, ...kids));
  c.link = h("a", { href: `#/tasks/${encodeURIComponent(t.id)}` });
  c.pick = h("input", { type: "checkbox", class: "pick", checked: picked.has(t.id), "aria-label": `Compare ${t.name || t.id}`, onchange: () => pick(t.id, c.pick.checked) });
  c.badge = statusBadge(t.status);
  c.note = h("span", { class: "muted small" });
  c.queue = h("div", { class: "queue-note small muted", hidden: true });
  c.bar = progressBar(`Progress of ${t.name || t.id}`);
  c.pct = h("span", { class: "pct" });
  const tr = h(
    "tr",
    { dataset: { id: t.id } },
    cell("name", c.pick, c.link),
    cell("model"),
    cell("status", c.badge, c.note, c.queue),
    cell("progress", c.bar, c.pct),
    cell("step"),
    cell("epoch"),
    cell("loss"),
    cell("elapsed"),
    cell("eta"),
    cell("created", (c.time = h("time"))),
  );
  return { tr, c };
}

function updateRow({ tr, c }, t, names) {
  tr.dataset.status = t.status;
  setText(c.link, t.name || t.id);
  setText(c.model, t.model);
  c.model.title = t.model || "";
  setBadge(c.badge, t.status);
  const note = noteFor(t);
  setText(c.note, note ? ` ${note[0]}` : "");
  c.note.title = note ? note[1] : "";
  const queueKey = JSON.stringify([t.queue || null, (t.queue?.blocked_by || []).map((id) => names.get(id))]);
  if (c.queue.dataset.key !== queueKey) {
    c.queue.dataset.key = queueKey;
    const why = t.queue && t.queue.position > 0 ? [" — ", ...reasonNodes(t.queue.reason, t.queue.blocked_by, names)] : [];
    c.queue.replaceChildren(...(t.queue ? [h("strong", {}, queuePlace(t.queue)), ...why] : []));
    c.queue.hidden = !t.queue;
  }
  const running = RUNNING.has(t.status);
  c.bar.update(t.percent, running);
  setText(c.pct, isNum(t.percent) ? `${Math.floor(t.percent)}%` : "");
  setText(c.step, fmtOf(t.step, t.total_steps));
  setText(c.epoch, isNum(t.epoch) || isNum(t.total_epochs) ? fmtOf(t.epoch, t.total_epochs, fmtEpoch) : "–");
  setText(c.loss, fmtLoss(t.loss));
  setText(c.elapsed, fmtDuration(t.elapsed_s));
  setText(c.eta, running ? fmtDuration(t.eta_s) : "–");
  setText(c.time, fmtTime(t.created_at));
  c.time.setAttribute("datetime", isoTime(t.created_at));
}

/** A word beside the badge, and its explanation: reattached, or what kind of pause. */
function noteFor(t) {
  if (t.reattached && RUNNING.has(t.status)) return ["reattached", "The studio restarted during this training; the training kept running and the studio reattached to it."];
  if (isPausing(t)) return ["pausing", "Saving a checkpoint at the next step, then it stops."];
  if (t.status === "paused" && (t.frozen || t.phase === "frozen")) return ["frozen", "The process is stopped where it was; its memory and GPU stay held until you resume or cancel."];
  if (t.status === "paused" && t.phase === "held") return ["held", "Paused while still in the queue."];
  return null;
}
