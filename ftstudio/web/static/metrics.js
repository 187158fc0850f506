// A method's own figures, beside the loss curve: what a preference run reports in its events' `metrics`
// (training/preference.py METRICS). For DPO the implicit rewards of the chosen and the rejected replies, their
// margin, and how often the chosen one wins; ORPO adds its SFT loss and odds ratio; KTO its drift from the
// reference (kl); GRPO (training/grpo.py) the mean reward and its spread within groups, each reward's mean and
// spread, the completions' length (right axis, in tokens) and, with a KL penalty, the drift. Training values are
// lines, evaluations dots. Hidden until a run reports any: SFT has none.

import { h, isNum, fmtInt } from "./dom.js";
import { Plot, cssColor } from "./plot.js";

// How each figure is called on the page; one not listed shows under its own name.
export const METRIC_WORDS = {
  "rewards/chosen": "reward of the chosen reply",
  "rewards/rejected": "reward of the rejected reply",
  "rewards/margins": "reward margin",
  "rewards/accuracies": "accuracy (chosen reply wins)",
  kl: "KL from the reference",
  nll_loss: "SFT loss",
  log_odds_ratio: "log odds ratio",
  reward: "reward (all rewards, mean)",
  reward_std: "reward spread within groups",
  "completions/mean_length": "completion length, tokens (right axis)",
};
// Figures counted in tokens, on the right axis, so they do not flatten the rewards.
const RIGHT = new Set(["completions/mean_length"]);

/** What a figure is called: a GRPO reward's `rewards/NAME/mean` reads as "NAME reward (mean)". */
export function metricWord(key) {
  if (METRIC_WORDS[key]) return METRIC_WORDS[key];
  const m = /^rewards\/(.+)\/(mean|std)$/.exec(key);
  return m ? `${m[1]} reward (${m[2] === "mean" ? "mean" : "spread"})` : key;
}
const COLOURS = 8; // --c-1 … --c-8, the compare view's palette

export class MetricsChart {
  constructor() {
    this.keys = []; // figures in the order they first arrived
    this.train = new Map(); // key -> Map(step -> value)
    this.evals = new Map();
    this.pending = false;
    this.plot = null;
    this.caption = h("p", { class: "metrics-caption muted", "aria-live": "off" });
    this.legend = h("ul", { class: "legend" });
    this.box = h("div", {});
    this.el = h(
      "figure",
      { class: "metrics-box", id: "method-metrics", hidden: true },
      h("h3", { class: "metrics-title" }, "What the method measures"),
      this.box,
      h("figcaption", {}, this.legend, this.caption),
    );
  }

  destroy() {
    if (this.plot) this.plot.destroy();
  }

  add(ev) {
    if (!ev || !isNum(ev.step) || !ev.metrics || typeof ev.metrics !== "object") return;
    const into = ev.kind === "progress" ? this.train : ev.kind === "eval" ? this.evals : null;
    if (!into) return;
    let fresh = false;
    for (const [key, value] of Object.entries(ev.metrics)) {
      if (!isNum(value)) continue;
      if (!this.keys.includes(key)) {
        this.keys.push(key);
        fresh = true;
      }
      if (!into.has(key)) into.set(key, new Map());
      into.get(key).set(ev.step, value); // a step a later attempt repeats overwrites
    }
    if (fresh) this.build();
    this.schedule();
  }

  /** A new figure means new series: uPlot is made again with one line and one set of dots per figure. */
  build() {
    if (this.plot) this.plot.destroy();
    const colour = (i) => cssColor(`--c-${(i % COLOURS) + 1}`);
    this.plot = new Plot({
      label: "Method metrics",
      xLabel: "step",
      yLabel: "value",
      logToggle: false,
      lrAxis: this.keys.some((k) => RIGHT.has(k)),
      rightLabel: "tokens",
      fmtX: fmtInt,
      fmtY: (v) => (isNum(v) ? Number(v.toPrecision(4)).toString() : ""),
      series: () =>
        this.keys.flatMap((key, i) => [
          { label: metricWord(key), scale: RIGHT.has(key) ? "lr" : "loss", stroke: colour(i), width: 2, points: { show: false }, spanGaps: true },
          { label: `${metricWord(key)}, eval`, scale: RIGHT.has(key) ? "lr" : "loss", stroke: colour(i), width: 1, dash: [6, 4], points: { show: true, size: 6, fill: colour(i) }, spanGaps: true },
        ]),
    });
    this.box.replaceChildren(this.plot.tools, this.plot.el);
    this.legend.replaceChildren(
      ...this.keys.map((key, i) => h("li", {}, h("span", { class: `swatch c-${(i % COLOURS) + 1}`, "aria-hidden": "true" }), metricWord(key))),
    );
    this.el.hidden = false;
  }

  schedule() {
    if (this.pending) return;
    this.pending = true;
    const run = () => {
      this.pending = false;
      this.render();
    };
    if (document.hidden) setTimeout(run, 250);
    else requestAnimationFrame(run);
  }

  render() {
    if (!this.plot) return;
    const steps = new Set();
    for (const m of [...this.train.values(), ...this.evals.values()]) for (const st of m.keys()) steps.add(st);
    const xs = [...steps].sort((a, b) => a - b);
    const col = (m) => xs.map((st) => (m && m.has(st) ? m.get(st) : null));
    const cols = [xs, ...this.keys.flatMap((key) => [col(this.train.get(key)), col(this.evals.get(key))])];
    this.plot.setData(cols, xs.length ? xs[xs.length - 1] : 1);
    const last = (m) => (m && m.size ? [...m.entries()].reduce((a, b) => (b[0] > a[0] ? b : a)) : null);
    const said = this.keys
      .map((key) => {
        const t = last(this.train.get(key));
        const e = last(this.evals.get(key));
        const word = metricWord(key);
        const parts = [t ? `${Number(t[1].toPrecision(3))} at step ${fmtInt(t[0])}` : null, e ? `eval ${Number(e[1].toPrecision(3))} at step ${fmtInt(e[0])}` : null];
        return `${word} ${parts.filter(Boolean).join(", ")}`;
      })
      .join("; ");
    this.caption.textContent = said ? `${said}.` : "";
    this.plot.el.dataset.metrics = this.keys.join(",");
    this.plot.el.dataset.points = String(xs.length);
    this.plot.el.setAttribute("aria-label", `Method metrics. ${this.caption.textContent}`);
  }
}
