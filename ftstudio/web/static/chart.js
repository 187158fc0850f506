// A task's loss curve: training loss and eval loss on the left axis, learning rate on the
// right one, a dashed mark where each later attempt began; drawn by uPlot (plot.js).
// Points are keyed by step, so a replayed or resumed event never draws twice, and
// history + live events join seamlessly.

import { h, isNum, fmtLoss, fmtInt } from "./dom.js";
import { Plot, cssColor } from "./plot.js";

export class LossChart {
  constructor() {
    this.loss = new Map();
    this.evalLoss = new Map();
    this.lr = new Map();
    // uPlot's columns, kept as events arrive: steps ascending, and the values at each (null for none).
    this.cols = [[], [], [], []];
    this.row = new Map(); // step -> its index in the columns
    this.stale = false; // a step arrived out of order: the columns are rebuilt from the maps
    this.totalSteps = null;
    this.attempts = []; // [attempt, step it began at] for every attempt after the first
    this.progressEvents = 0; // progress events received, duplicates included: tests compare it with the store
    this.pending = false;
    this.marks = h("div", { class: "attempt-marks" });
    this.plot = new Plot({
      label: "Loss curve",
      xLabel: "step",
      fmtX: fmtInt,
      fmtY: fmtLoss,
      lrAxis: true,
      series: () => [
        { label: "training loss", scale: "loss", stroke: cssColor("--c-loss"), width: 2, points: { show: false }, spanGaps: true, swatch: "loss" },
        { label: "eval loss", scale: "loss", stroke: cssColor("--c-eval"), width: 2, dash: [6, 4], points: { show: true, size: 6, fill: cssColor("--c-eval") }, spanGaps: true, swatch: "eval" },
        { label: "learning rate", scale: "lr", stroke: cssColor("--c-lr"), width: 1.5, dash: [2, 3], points: { show: false }, spanGaps: true, swatch: "lr" },
      ],
      onBuild: (u) => u.over.append(this.marks),
      onDraw: (u) => this.placeMarks(u),
    });
    this.chart = this.plot.el;
    this.caption = h("p", { class: "chart-caption muted", "aria-live": "off" }, "Waiting for the first training step…");
    const key = (cls, label) => h("li", {}, h("span", { class: `swatch ${cls}`, "aria-hidden": "true" }), label);
    this.el = h(
      "figure",
      { class: "chart-box" },
      this.plot.tools,
      this.chart,
      h("figcaption", {}, h("ul", { class: "legend" }, key("loss", "training loss (solid)"), key("eval", "eval loss (dashed, dots)"), key("lr", "learning rate (dotted, right axis)")), this.caption),
    );
    this.render();
  }

  destroy() {
    this.plot.destroy();
  }

  add(ev) {
    if (!ev) return;
    if (isNum(ev.total_steps)) this.totalSteps = ev.total_steps;
    if (!isNum(ev.step)) return;
    if (ev.kind === "progress") {
      this.progressEvents += 1;
      if (isNum(ev.loss)) this.put(this.loss, 1, ev.step, ev.loss);
      if (isNum(ev.lr)) this.put(this.lr, 3, ev.step, ev.lr);
    } else if (ev.kind === "eval" && isNum(ev.eval_loss)) {
      this.put(this.evalLoss, 2, ev.step, ev.eval_loss);
    } else {
      return;
    }
    this.schedule();
  }

  /** One value at a step, in its map and in the columns (a step repeated by a later attempt overwrites). */
  put(map, col, step, value) {
    map.set(step, value);
    if (this.stale) return;
    let i = this.row.get(step);
    if (i === undefined) {
      const xs = this.cols[0];
      if (xs.length && step < xs[xs.length - 1]) {
        this.stale = true;
        return;
      }
      i = xs.length;
      this.row.set(step, i);
      for (const c of this.cols) c.push(null);
      xs[i] = step;
    }
    this.cols[col][i] = value;
  }

  rebuildColumns() {
    const steps = [...new Set([...this.loss.keys(), ...this.evalLoss.keys(), ...this.lr.keys()])].sort((a, b) => a - b);
    const col = (m) => steps.map((st) => (m.has(st) ? m.get(st) : null));
    this.cols = [steps, col(this.loss), col(this.evalLoss), col(this.lr)];
    this.row = new Map(steps.map((st, i) => [st, i]));
    this.stale = false;
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
    this.marks.replaceChildren(
      ...marks.map(([n, st]) =>
        h(
          "div",
          { class: "attempt-mark", dataset: { attempt: n, step: st }, title: st ? `attempt ${n} resumed from step ${fmtInt(st)}` : `attempt ${n} started from the beginning` },
          h("span", {}, `attempt ${n}`),
        ),
      ),
    );
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
    if (this.stale) this.rebuildColumns();
    const xs = this.cols[0];
    // New arrays each time: uPlot keeps the ones it is given.
    this.plot.setData(
      this.cols.map((c) => c.slice()),
      Math.max(this.totalSteps || 0, xs.length ? xs[xs.length - 1] : 0),
    );

    const lastLoss = lastKey(this.loss);
    const lastEval = lastKey(this.evalLoss);
    const chart = this.chart;
    chart.dataset.points = String(this.loss.size);
    chart.dataset.progressEvents = String(this.progressEvents);
    chart.dataset.evalPoints = String(this.evalLoss.size);
    chart.dataset.lastStep = String(lastLoss ?? 0);
    chart.dataset.attempts = this.attempts.map(([n, st]) => `${n}@${st}`).join(",");

    const summary =
      lastLoss != null
        ? `Training loss ${fmtLoss(this.loss.get(lastLoss))} at step ${fmtInt(lastLoss)}${this.totalSteps ? ` of ${fmtInt(this.totalSteps)}` : ""}` +
          (lastEval != null ? `; eval loss ${fmtLoss(this.evalLoss.get(lastEval))} at step ${fmtInt(lastEval)}` : "") +
          ` (${fmtInt(this.loss.size)} points).`
        : this.ended
          ? `No training step was recorded before the task ${this.ended === "cancelled" ? "was cancelled" : this.ended}.`
          : "Waiting for the first training step…";
    this.caption.textContent = summary;
    chart.setAttribute("aria-label", `Loss curve. ${summary}`);
  }

  /** The attempt marks sit over the plot at their step; one outside the zoomed range is hidden. */
  placeMarks(u) {
    const { min, max } = u.scales.x;
    for (const mark of this.marks.children) {
      const st = Number(mark.dataset.step);
      mark.hidden = !(st >= min && st <= max);
      mark.style.left = `${u.valToPos(st, "x")}px`;
    }
  }
}

/** The highest step in a map of step -> value, or null. */
export function lastKey(m) {
  let last = null;
  for (const k of m.keys()) if (last === null || k > last) last = k;
  return last;
}
