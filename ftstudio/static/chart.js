// A small hand-drawn SVG chart: training loss and eval loss on the left axis,
// learning rate on the right one. Points are keyed by step, so a replayed or
// resumed event never draws twice, and history + live events join seamlessly.

import { h, isNum, fmtLoss, fmtLr, fmtInt } from "./dom.js";

// A namespace name, not a URL anything is fetched from.
const SVG_NS = "http://www.w3.org/2000/svg";
const W = 720;
const H = 280;
const M = { left: 56, right: 68, top: 14, bottom: 34 };

function s(tag, attrs = {}, text) {
  const el = document.createElementNS(SVG_NS, tag);
  for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, String(v));
  if (text != null) el.textContent = text;
  return el;
}

function niceTicks(lo, hi, count = 5) {
  if (!(hi > lo)) return [lo];
  const raw = (hi - lo) / count;
  const mag = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 2.5, 5, 10].map((m) => m * mag).find((x) => x >= raw) || raw;
  const ticks = [];
  for (let t = Math.ceil(lo / step) * step; t <= hi + step * 1e-9; t += step) ticks.push(Number(t.toPrecision(12)));
  return ticks;
}

export class LossChart {
  constructor() {
    this.loss = new Map();
    this.evalLoss = new Map();
    this.lr = new Map();
    this.totalSteps = null;
    this.attempts = []; // [attempt, step it began at] for every attempt after the first
    this.progressEvents = 0; // progress events received, duplicates included: tests compare it with the store
    this.pending = false;
    this.svg = s("svg", { viewBox: `0 0 ${W} ${H}`, class: "chart", role: "img", "aria-label": "Loss curve" });
    this.caption = h("p", { class: "chart-caption muted", "aria-live": "off" }, "Waiting for the first training step…");
    const key = (cls, label) => h("li", {}, h("span", { class: `swatch ${cls}`, "aria-hidden": "true" }), label);
    this.el = h(
      "figure",
      { class: "chart-box" },
      this.svg,
      h("figcaption", {}, h("ul", { class: "legend" }, key("loss", "training loss (solid)"), key("eval", "eval loss (dashed, dots)"), key("lr", "learning rate (dotted, right axis)")), this.caption),
    );
    this.render();
  }

  add(ev) {
    if (!ev) return;
    if (isNum(ev.total_steps)) this.totalSteps = ev.total_steps;
    if (!isNum(ev.step)) return;
    if (ev.kind === "progress") {
      this.progressEvents += 1;
      if (isNum(ev.loss)) this.loss.set(ev.step, ev.loss);
      if (isNum(ev.lr)) this.lr.set(ev.step, ev.lr);
    } else if (ev.kind === "eval" && isNum(ev.eval_loss)) {
      this.evalLoss.set(ev.step, ev.eval_loss);
    } else {
      return;
    }
    this.schedule();
  }

  /** A task that ended: an empty chart says so instead of waiting. */
  setEnded(status) {
    this.ended = status;
    this.schedule();
  }

  /** Where each later attempt began (resumed from a checkpoint, or from step 0): a mark on the step axis. */
  setAttempts(attempts) {
    const marks = (attempts || []).filter((a) => a.attempt > 1).map((a) => [a.attempt, isNum(a.resumed_from_step) ? a.resumed_from_step : 0]);
    if (JSON.stringify(marks) === JSON.stringify(this.attempts)) return;
    this.attempts = marks;
    this.schedule();
  }

  setTotal(total) {
    if (isNum(total) && total !== this.totalSteps) {
      this.totalSteps = total;
      this.schedule();
    }
  }

  schedule() {
    if (this.pending) return;
    this.pending = true;
    const run = () => {
      this.pending = false;
      this.render();
    };
    // rAF batches bursts of events into one draw; a timer covers hidden tabs.
    if (document.hidden) setTimeout(run, 250);
    else requestAnimationFrame(run);
  }

  render() {
    const series = (m) => [...m.entries()].sort((a, b) => a[0] - b[0]);
    const loss = series(this.loss);
    const evals = series(this.evalLoss);
    const lr = series(this.lr);
    const svg = this.svg;
    svg.replaceChildren();
    svg.dataset.points = String(loss.length);
    svg.dataset.progressEvents = String(this.progressEvents);
    svg.dataset.evalPoints = String(evals.length);
    svg.dataset.lastStep = String(loss.length ? loss[loss.length - 1][0] : 0);

    const maxStep = Math.max(1, this.totalSteps || 0, loss.length ? loss[loss.length - 1][0] : 0, evals.length ? evals[evals.length - 1][0] : 0);
    const ys = [...loss, ...evals].map((p) => p[1]);
    let lo = ys.length ? ys.reduce((a, b) => Math.min(a, b)) : 0;
    let hi = ys.length ? ys.reduce((a, b) => Math.max(a, b)) : 1;
    if (hi - lo < 1e-9) {
      lo -= 0.5;
      hi += 0.5;
    }
    const pad = (hi - lo) * 0.06;
    lo = Math.max(lo > 0 ? 0 : -Infinity, lo - pad);
    hi += pad;
    const lrMax = lr.length ? lr.reduce((a, p) => Math.max(a, p[1]), 0) * 1.1 || 1 : 1;

    const pw = W - M.left - M.right;
    const ph = H - M.top - M.bottom;
    const x = (step) => M.left + (step / maxStep) * pw;
    const y = (v) => M.top + ph - ((v - lo) / (hi - lo)) * ph;
    const yr = (v) => M.top + ph - (v / lrMax) * ph;

    const grid = s("g", { class: "grid" });
    const axes = s("g", { class: "axis" });
    for (const t of niceTicks(lo, hi)) {
      if (t < lo || t > hi) continue;
      grid.append(s("line", { x1: M.left, x2: W - M.right, y1: y(t), y2: y(t) }));
      axes.append(s("text", { x: M.left - 6, y: y(t) + 4, "text-anchor": "end" }, String(Number(t.toPrecision(6)))));
    }
    for (const t of niceTicks(0, maxStep, 6)) {
      if (!Number.isInteger(t)) continue;
      axes.append(s("text", { x: x(t), y: H - M.bottom + 16, "text-anchor": "middle" }, fmtInt(t)));
    }
    if (lr.length) {
      for (const t of niceTicks(0, lrMax, 4)) axes.append(s("text", { x: W - M.right + 6, y: yr(t) + 4, class: "lr-tick" }, fmtLr(t)));
    }
    axes.append(s("text", { x: M.left + pw / 2, y: H - 2, "text-anchor": "middle", class: "axis-title" }, "step"));
    axes.append(s("text", { x: 12, y: M.top + ph / 2, "text-anchor": "middle", class: "axis-title", transform: `rotate(-90 12 ${M.top + ph / 2})` }, "loss"));
    axes.append(s("text", { x: W - 10, y: M.top + ph / 2, "text-anchor": "middle", class: "axis-title", transform: `rotate(90 ${W - 10} ${M.top + ph / 2})` }, "learning rate"));
    axes.append(s("rect", { x: M.left, y: M.top, width: pw, height: ph, class: "frame" }));
    svg.append(grid, axes);

    // Where each later attempt began: the steps right of a mark were trained (again) by that attempt.
    svg.dataset.attempts = this.attempts.map(([n, st]) => `${n}@${st}`).join(",");
    for (const [n, st] of this.attempts) {
      const mark = s("g", { class: "attempt-mark", "data-attempt": n, "data-step": st });
      mark.append(
        s("title", {}, st ? `attempt ${n} resumed from step ${fmtInt(st)}` : `attempt ${n} started from the beginning`),
        s("line", { x1: x(st), x2: x(st), y1: M.top, y2: M.top + ph }),
        s("text", { x: x(st) + 4, y: M.top + 12 }, `attempt ${n}`),
      );
      svg.append(mark);
    }

    const path = (pts, fx, fy, cls) => {
      const thin = thinOut(pts, fx, pw);
      if (!thin.length) return;
      const d = thin.map((p, i) => `${i ? "L" : "M"}${fx(p[0]).toFixed(1)},${fy(p[1]).toFixed(1)}`).join("");
      svg.append(s("path", { d, class: `line ${cls}` }));
    };
    path(lr, x, yr, "lr");
    path(loss, x, y, "loss");
    path(evals, x, y, "eval");
    if (evals.length <= 200) for (const [st, v] of evals) svg.append(s("circle", { cx: x(st), cy: y(v), r: 3, class: "dot eval" }));

    const last = loss[loss.length - 1];
    const lastEval = evals[evals.length - 1];
    const summary = last
      ? `Training loss ${fmtLoss(last[1])} at step ${fmtInt(last[0])}${this.totalSteps ? ` of ${fmtInt(this.totalSteps)}` : ""}` +
        (lastEval ? `; eval loss ${fmtLoss(lastEval[1])} at step ${fmtInt(lastEval[0])}` : "") +
        ` (${fmtInt(loss.length)} points).`
      : this.ended
        ? `No training step was recorded before the task ${this.ended === "cancelled" ? "was cancelled" : this.ended}.`
        : "Waiting for the first training step…";
    this.caption.textContent = summary;
    svg.setAttribute("aria-label", `Loss curve. ${summary}`);
  }
}

/** At most ~2 points per pixel column (min and max), so 100k steps draw as fast as 100. */
function thinOut(pts, fx, width) {
  if (pts.length <= width * 2) return pts;
  const out = [];
  let col = null;
  let mn = null;
  let mx = null;
  const flush = () => {
    if (!mn) return;
    if (mn[0] <= mx[0]) out.push(mn, mx);
    else out.push(mx, mn);
  };
  for (const p of pts) {
    const c = Math.floor(fx(p[0]));
    if (c !== col) {
      flush();
      col = c;
      mn = mx = p;
    } else {
      if (p[1] < mn[1]) mn = p;
      if (p[1] > mx[1]) mx = p;
    }
  }
  flush();
  return out;
}
