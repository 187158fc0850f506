// Compare fine-tunes (#/compare?tasks=ID1,ID2[&x=tokens][&scale=log]): their training and
// eval loss on one chart, by step or by tokens seen, and a table of only the settings that
// differ between them with each one's results. Tasks still training are followed by
// polling (every few seconds), keyed by step like the task view's curve.

import { api, ApiError, taskUrl } from "./api.js";
import { h, setText, isNum, fmtInt, fmtLoss, fmtDuration, fmtOf } from "./dom.js";
import { Plot, cssColor } from "./plot.js";
import { FINAL, STATUSES, statusBadge } from "./status.js";
import { lastKey } from "./chart.js";

export const MAX_COMPARED = 8; // one colour each (--c-1 … --c-8)
const REFRESH_MS = 5000;

export function mountCompare(root, params) {
  const asked = [...new Set((params.get("tasks") || "").split(",").map((s) => s.trim()).filter(Boolean))];
  const ids = asked.slice(0, MAX_COMPARED);
  let xKind = params.get("x") === "tokens" ? "tokens" : "step";
  let destroyed = false;
  let timer = null;
  let runs = [];
  let plot = null;

  document.title = "Compare fine-tunes · ftstudio";
  const notice = h("div", { class: "notice", id: "compare-notice", role: "status", hidden: true });
  const error = h("p", { class: "error-text", role: "alert", hidden: true });
  const body = h("div", {}, h("p", { class: "muted" }, "Loading…"));
  root.append(
    h(
      "article",
      { "aria-labelledby": "compare-title" },
      h("p", { class: "crumbs" }, h("a", { href: "#/tasks" }, "← All fine-tunes")),
      h("h1", { id: "compare-title", tabindex: "-1" }, "Compare fine-tunes"),
      notice,
      error,
      body,
    ),
  );

  if (ids.length < 2) {
    body.replaceChildren(h("p", {}, "Pick two or more fine-tunes in the ", h("a", { href: "#/tasks" }, "list"), " (the boxes beside their names), then press Compare."));
    return { destroy() {} };
  }

  async function start() {
    const found = await Promise.all(ids.map((id) => loadTask(id)));
    if (destroyed) return;
    const missing = ids.filter((_id, i) => !found[i]);
    runs = found.filter(Boolean).map((task, i) => ({ task, color: i + 1, loss: new Map(), evalLoss: new Map(), tokens: new Map(), after: 0 }));
    const notes = [];
    if (asked.length > MAX_COMPARED) notes.push(`Only the first ${MAX_COMPARED} of the ${asked.length} fine-tunes asked for are compared.`);
    if (missing.length) notes.push(`Not found (deleted?): ${missing.join(", ")}.`);
    notice.replaceChildren(notes.join(" "));
    notice.hidden = !notes.length;
    if (runs.length < 2) {
      body.replaceChildren(h("p", {}, "There is nothing to compare: fewer than two of these fine-tunes exist. ", h("a", { href: "#/tasks" }, "Back to the list"), "."));
      return;
    }
    await Promise.all(runs.map(loadEvents));
    if (destroyed) return;
    layout();
    render();
    schedule();
  }

  async function loadTask(id) {
    try {
      return await api(taskUrl(id));
    } catch (err) {
      if (err instanceof ApiError && err.status === 404) return null;
      showError(err);
      return null;
    }
  }

  /** The stored events after the last one seen: every page of them. */
  async function loadEvents(run) {
    for (let i = 0; i < 1000 && !destroyed; i++) {
      const r = await api(taskUrl(run.task.id, `/metrics?after=${run.after}`));
      const events = (r && r.events) || [];
      for (const ev of events) {
        if (isNum(ev.seq)) run.after = Math.max(run.after, ev.seq);
        if (!isNum(ev.step)) continue;
        if (ev.kind === "progress") {
          if (isNum(ev.loss)) run.loss.set(ev.step, ev.loss);
          if (isNum(ev.tokens)) run.tokens.set(ev.step, ev.tokens);
        } else if (ev.kind === "eval" && isNum(ev.eval_loss)) {
          run.evalLoss.set(ev.step, ev.eval_loss);
        }
      }
      if (!events.length) break;
    }
  }

  function schedule() {
    clearTimeout(timer);
    if (destroyed || runs.every((r) => FINAL.has(r.task.status))) return;
    timer = setTimeout(refresh, REFRESH_MS);
  }

  async function refresh() {
    if (destroyed) return;
    if (!document.hidden) {
      try {
        await Promise.all(
          runs
            .filter((r) => !FINAL.has(r.task.status))
            .map(async (r) => {
              r.task = await api(taskUrl(r.task.id));
              await loadEvents(r);
            }),
        );
        if (destroyed) return;
        error.hidden = true;
        render();
      } catch (err) {
        showError(err);
      }
    }
    schedule();
  }

  function showError(err) {
    if (destroyed) return;
    error.textContent = `Could not load the fine-tunes: ${err.message}`;
    error.hidden = false;
  }

  // -- the page ----------------------------------------------------------------

  let caption;
  let legend;
  let table;
  let xSelect;

  function layout() {
    // A task trained before progress events carried `tokens` can only be drawn by step.
    const hasTokens = runs.every((r) => r.tokens.size > 0 || r.loss.size === 0);
    if (!hasTokens) xKind = "step";
    plot = new Plot({
      label: "Loss curves of the compared fine-tunes",
      xLabel: xKind === "tokens" ? "tokens seen" : "step",
      fmtX: fmtInt,
      fmtY: fmtLoss,
      series: () =>
        runs.flatMap((r) => {
          const stroke = cssColor(`--c-${r.color}`);
          const name = r.task.name || r.task.id;
          return [
            { label: `${name}: training loss`, scale: "loss", stroke, width: 2, points: { show: false }, spanGaps: true, swatch: `c-${r.color}` },
            { label: `${name}: eval loss`, scale: "loss", stroke, width: 2, dash: [6, 4], points: { show: true, size: 6, fill: stroke }, spanGaps: true, swatch: `c-${r.color} eval` },
          ];
        }),
      onLog: () => bookmark(),
    });
    if (params.get("scale") === "log") plot.setLog(true);
    xSelect = h(
      "select",
      { id: "compare-x", onchange: () => setX(xSelect.value) },
      h("option", { value: "step", selected: xKind === "step" }, "step"),
      h("option", { value: "tokens", selected: xKind === "tokens", disabled: !hasTokens }, hasTokens ? "tokens seen" : "tokens seen (not recorded by every one of these)"),
    );
    plot.tools.prepend(h("label", { for: "compare-x" }, "x axis "), xSelect);
    legend = h("ul", { class: "legend" });
    caption = h("p", { class: "chart-caption muted", id: "compare-caption" });
    table = h("table", { class: "compare", id: "compare-table" });
    body.replaceChildren(
      h(
        "section",
        { "aria-labelledby": "compare-curves" },
        h("h2", { id: "compare-curves" }, "Loss curves"),
        h("figure", { class: "chart-box" }, plot.tools, plot.el, h("figcaption", {}, legend, h("p", { class: "muted small legend-note" }, "Training loss solid, eval loss dashed with dots."), caption)),
      ),
      h("section", { "aria-labelledby": "compare-diff" }, h("h2", { id: "compare-diff" }, "What differs"), h("div", { class: "table-wrap" }, table)),
    );
  }

  function setX(kind) {
    xKind = kind;
    xSelect.value = kind;
    plot.o.xLabel = kind === "tokens" ? "tokens seen" : "step";
    plot.zoom = null;
    plot.zoomChanged();
    plot.rebuild();
    render();
    bookmark();
  }

  /** The address says what is shown, so it can be bookmarked or shared (without a new history entry). */
  function bookmark() {
    const q = new URLSearchParams({ tasks: ids.join(",") });
    if (xKind === "tokens") q.set("x", "tokens");
    if (plot?.log) q.set("scale", "log");
    history.replaceState(null, "", `#/compare?${q.toString().replace(/%2C/g, ",")}`);
  }

  function render() {
    plot.setData(...chartData());
    plot.el.dataset.tasks = String(runs.length);
    plot.el.dataset.x = xKind;
    plot.el.dataset.points = runs.map((r) => r.loss.size).join(",");
    legend.replaceChildren(
      ...runs.map((r) =>
        h("li", {}, h("span", { class: `swatch c-${r.color}`, "aria-hidden": "true" }), h("a", { href: `#/tasks/${encodeURIComponent(r.task.id)}` }, r.task.name || r.task.id)),
      ),
    );
    setText(caption, `Comparing ${runs.length} fine-tunes by ${xKind === "tokens" ? "tokens seen" : "step"}. ${runs.map(summary).join(" ")}`);
    plot.el.setAttribute("aria-label", `Loss curves. ${caption.textContent}`);
    renderTable();
  }

  /** Aligned columns for uPlot: the union of every task's x values, null where a task has no point. */
  function chartData() {
    const xOf = (r, step) => (xKind === "tokens" ? tokensAt(r, step) : step);
    const cols = runs.map((r) => [pointsOf(r.loss, (st) => xOf(r, st)), pointsOf(r.evalLoss, (st) => xOf(r, st))]);
    const xs = [...new Set(cols.flatMap(([a, b]) => [...a.keys(), ...b.keys()]))].sort((a, b) => a - b);
    const data = [xs];
    for (const [loss, evals] of cols) {
      data.push(xs.map((x) => (loss.has(x) ? loss.get(x) : null)));
      data.push(xs.map((x) => (evals.has(x) ? evals.get(x) : null)));
    }
    const total = xKind === "step" ? Math.max(0, ...runs.map((r) => r.task.total_steps || 0)) : 0;
    return [data, Math.max(total, xs.length ? xs[xs.length - 1] : 0)];
  }

  function renderTable() {
    const head = h(
      "tr",
      {},
      h("th", { scope: "col" }, h("span", { class: "visually-hidden" }, "Setting")),
      runs.map((r) =>
        h("th", { scope: "col" }, h("span", { class: `swatch c-${r.color}`, "aria-hidden": "true" }), h("a", { href: `#/tasks/${encodeURIComponent(r.task.id)}` }, r.task.name || r.task.id)),
      ),
    );
    const configs = runs.map((r) => flatten(typeof r.task.config === "object" && r.task.config ? r.task.config : {}));
    const keys = [...new Set(configs.flatMap((c) => [...c.keys()]))].sort();
    const differ = keys.filter((k) => new Set(configs.map((c) => (c.has(k) ? JSON.stringify(c.get(k)) : "\u0000missing"))).size > 1);
    const rows = differ.map((k) => h("tr", { dataset: { field: k } }, h("th", { scope: "row" }, h("code", {}, k)), configs.map((c) => h("td", {}, c.has(k) ? shown(c.get(k)) : "–"))));
    const same = keys.length - differ.length;
    const sameRow = h("tr", { class: "same" }, h("td", { colspan: runs.length + 1, class: "muted" }, differ.length ? `The other ${fmtInt(same)} settings are the same in all.` : `All ${fmtInt(same)} settings are the same.`));

    const stats = runs.map(resultsOf);
    const result = (label, key, fmt, lowest = false) => {
      const values = stats.map((s) => s[key]);
      const nums = values.filter(isNum);
      const best = lowest && nums.length > 1 ? Math.min(...nums) : null;
      return h(
        "tr",
        { dataset: { result: key } },
        h("th", { scope: "row" }, label),
        values.map((v) => h("td", { class: "num" }, fmt(v), best != null && v === best ? h("span", { class: "lowest" }, " lowest") : null)),
      );
    };
    table.replaceChildren(
      h("caption", { class: "visually-hidden" }, "Settings that differ between the compared fine-tunes, and their results"),
      h("thead", {}, head),
      h("tbody", { class: "settings" }, rows, sameRow),
      h(
        "tbody",
        { class: "results" },
        h("tr", {}, h("th", { scope: "row" }, "Status"), runs.map((r) => h("td", {}, statusBadge(r.task.status)))),
        result("Steps", "steps", (v) => v),
        result("Final training loss", "final", fmtLoss, true),
        result("Best training loss", "best", fmtLoss, true),
        result("Best eval loss", "bestEval", fmtLoss, true),
        result("Tokens/s", "tps", fmtInt),
        result("Wall time", "wall", fmtDuration),
      ),
    );
  }

  start();
  return {
    destroy() {
      destroyed = true;
      clearTimeout(timer);
      plot?.destroy();
    },
  };
}

/** step -> value, re-keyed by x (the step itself, or the tokens seen by then); a step with no x is left out. */
function pointsOf(m, xOf) {
  const out = new Map();
  for (const [step, v] of m) {
    const x = xOf(step);
    if (isNum(x)) out.set(x, v);
  }
  return out;
}

/** Tokens seen by a step: from that step's progress event, else the latest one before it (an eval step may not be logged). */
function tokensAt(run, step) {
  if (run.tokens.has(step)) return run.tokens.get(step);
  let best = null;
  let at = -Infinity;
  for (const [st, t] of run.tokens) {
    if (st <= step && st > at) {
      at = st;
      best = t;
    }
  }
  return best;
}

function resultsOf(run) {
  const t = run.task;
  const last = lastKey(run.loss);
  const min = (m) => (m.size ? [...m.values()].reduce((a, b) => Math.min(a, b)) : null);
  return {
    steps: fmtOf(t.step, t.total_steps),
    final: last != null ? run.loss.get(last) : t.loss,
    best: min(run.loss),
    bestEval: min(run.evalLoss),
    tps: t.tokens_per_s,
    wall: t.elapsed_s,
  };
}

function summary(run) {
  const name = run.task.name || run.task.id;
  const r = resultsOf(run);
  const last = lastKey(run.loss);
  const status = STATUSES[run.task.status]?.label.toLowerCase() || run.task.status;
  if (last == null) return `${name} (${status}): no training step recorded.`;
  return `${name} (${status}): training loss ${fmtLoss(r.final)} at step ${fmtInt(last)}, best ${fmtLoss(r.best)}${isNum(r.bestEval) ? `; best eval loss ${fmtLoss(r.bestEval)}` : ""}.`;
}

/** {optim: {learning_rate: 3e-4}} -> Map {"optim.learning_rate" => 3e-4}; a list stays one value. */
export function flatten(obj, prefix = "", out = new Map()) {
  for (const [k, v] of Object.entries(obj)) {
    const key = prefix ? `${prefix}.${k}` : k;
    if (v && typeof v === "object" && !Array.isArray(v)) flatten(v, key, out);
    else out.set(key, v);
  }
  return out;
}

function shown(v) {
  if (typeof v === "string") return v === "" ? "(empty)" : v;
  return JSON.stringify(v);
}
