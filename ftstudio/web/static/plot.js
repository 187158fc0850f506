// One chart drawn by uPlot (vendor/uplot, MIT, loaded by index.html as a classic script):
// the loss curve of a task and the comparison of tasks both use it. What it adds to
// uPlot: the page's colours (light and dark), its width following the page, drag to
// zoom and double-click (or the button) to zoom out, a log scale for loss, a read-out
// under the pointer, and the state on data-* attributes that the browser tests read.
// uPlot styles its elements through the CSSOM, which the page's CSP allows.

import { h, isNum, fmtInt } from "./dom.js";

const HEIGHT = 280;
// Whole-number ticks on the x axis: steps and tokens are counted, never halved.
const INT_INCRS = [];
for (let mag = 1; mag <= 1e12; mag *= 10) INT_INCRS.push(mag, 2 * mag, 5 * mag);

/** A colour the stylesheet defines (uPlot draws on a canvas, which cannot read CSS variables). */
export function cssColor(name) {
  return getComputedStyle(document.documentElement).getPropertyValue(name).trim() || "#888";
}

export class Plot {
  /**
   * @param {object} o
   * @param {string} o.label         what the chart shows, for screen readers (the summary follows it)
   * @param {() => object[]} o.series uPlot series after x, built when the chart is (colours are read then)
   * @param {string} o.xLabel
   * @param {(v: number) => string} o.fmtX   the x value in the read-out
   * @param {(v: number) => string} o.fmtY   a loss value on its axis and in the read-out
   * @param {boolean} [o.lrAxis]     a right axis for the learning rate (scale "lr")
   * @param {string} [o.rightLabel]  that right axis's label, when it holds something else (then plain numbers)
   * @param {string} [o.yLabel]      the left axis (default "loss")
   * @param {boolean} [o.logToggle]  offer the log scale (default true: losses; not for values that go negative)
   * @param {(u: object) => void} [o.onBuild] once uPlot is made (again, after a log switch or a theme change)
   * @param {(u: object) => void} [o.onDraw]  after every draw (positions of marks over the plot)
   * @param {(on: boolean) => void} [o.onLog] the log scale was switched
   */
  constructor(o) {
    this.o = o;
    this.u = null;
    this.data = [[]];
    this.scales = []; // each column's scale key, from the series
    this.zoom = null; // [min, max] of x while zoomed in, else null: the whole domain is shown
    this.domainMax = 1;
    this.log = false;
    this.width = 0;

    this.el = h("div", { class: "chart", role: "img", "aria-label": o.label, dataset: { scale: "linear", zoomed: "false" } });
    this.readout = h("div", { class: "chart-readout", "aria-hidden": "true", hidden: true });
    const logBox = h("input", { type: "checkbox", class: "log-toggle", onchange: () => this.setLog(logBox.checked) });
    this.logBox = logBox;
    this.resetButton = h("button", { type: "button", class: "secondary small-button", hidden: true, onclick: () => this.resetZoom() }, "Zoom out");
    this.tools = h(
      "div",
      { class: "chart-tools" },
      o.logToggle === false ? null : h("label", {}, logBox, " Log scale for loss"),
      this.resetButton,
      h("span", { class: "muted small" }, "Drag across the chart to zoom in; double-click to zoom out."),
    );

    this.resize = new ResizeObserver(() => this.fit());
    this.resize.observe(this.el);
    this.dark = window.matchMedia("(prefers-color-scheme: dark)");
    this.onTheme = () => this.rebuild();
    this.dark.addEventListener("change", this.onTheme);
  }

  destroy() {
    this.resize.disconnect();
    this.dark.removeEventListener("change", this.onTheme);
    this.u?.destroy();
    this.u = null;
  }

  /** New aligned data ([xs, ...ys], uPlot's shape) and the right end of the x axis when not zoomed. */
  setData(data, domainMax) {
    this.data = data;
    this.domainMax = Math.max(1, isNum(domainMax) ? domainMax : 0);
    if (!this.u) return this.fit();
    // Every array is new, so uPlot redraws once; the x range comes from range() below (zoom or domain).
    this.u.setData(this.shown(), true);
  }

  setLog(on) {
    if (on === this.log) return;
    this.log = on;
    this.logBox.checked = on;
    this.el.dataset.scale = on ? "log" : "linear";
    this.rebuild(); // uPlot fixes a scale's distribution when it is made
    this.o.onLog?.(on);
  }

  resetZoom() {
    this.zoom = null;
    this.u?.setScale("x", { min: 0, max: this.domainMax });
    this.zoomChanged();
  }

  /** On a log scale a loss of 0 (or less) has no place: it is left out rather than drawn at -infinity. */
  shown() {
    if (!this.log) return this.data;
    return this.data.map((col, i) => (i === 0 || this.scaleOf(i) !== "loss" ? col : col.map((v) => (v > 0 ? v : null))));
  }

  scaleOf(i) {
    return this.scales[i];
  }

  fit() {
    const width = Math.floor(this.el.clientWidth);
    if (!width) return; // not on the page yet; the observer calls again when it is
    if (!this.u) return this.build(width);
    if (width !== this.width) {
      this.width = width;
      this.u.setSize({ width, height: HEIGHT });
    }
  }

  rebuild() {
    if (!this.u) return;
    this.u.destroy();
    this.u = null;
    this.fit();
  }

  build(width) {
    const uPlot = globalThis.uPlot;
    const o = this.o;
    this.width = width;
    const muted = cssColor("--muted");
    const line = cssColor("--line");
    const font = "11px system-ui, sans-serif";
    const axis = { stroke: muted, font, labelFont: "12px system-ui, sans-serif", grid: { stroke: line, width: 1 }, ticks: { stroke: line, width: 1 } };
    const lossRange = (_u, min, max) => {
      if (!isNum(min) || !isNum(max)) return [0, 1];
      if (max - min < 1e-9) return [Math.max(min >= 0 ? 0 : -Infinity, min - 0.5), max + 0.5];
      const pad = (max - min) * 0.06;
      return [Math.max(min >= 0 ? 0 : -Infinity, min - pad), max + pad];
    };
    const axes = [
      { ...axis, label: o.xLabel, incrs: INT_INCRS, values: (_u, ticks) => ticks.map((t) => fmtInt(t)) },
      {
        ...axis,
        scale: "loss",
        label: o.yLabel || "loss",
        size: 56,
        values: (_u, ticks) => {
          const shown = ticks.map((t) => (t == null ? "" : String(Number(t.toPrecision(6)))));
          this.el.dataset.lossTicks = shown.filter(Boolean).join(" "); // what the axis says, for the tests
          return shown;
        },
      },
    ];
    const scales = {
      x: { time: false, range: (_u, min, max) => this.zoom || [0, Math.max(this.domainMax, isNum(max) ? max : 0)] },
      loss: this.log ? { distr: 3, log: 10 } : { range: lossRange },
    };
    if (o.lrAxis) {
      const plain = (t) => (t == null ? "" : String(Number(t.toPrecision(4))));
      const exp = (t) => (t ? t.toExponential(1) : "0");
      axes.push({ ...axis, scale: "lr", side: 1, label: o.rightLabel || "learning rate", size: 64, grid: { show: false }, values: (_u, ticks) => ticks.map(o.rightLabel ? plain : exp) });
      scales.lr = { range: (_u, _min, max) => [0, (isNum(max) && max > 0 ? max : 1) * 1.1] };
    }
    const opts = {
      width,
      height: HEIGHT,
      legend: { show: false },
      scales,
      axes,
      series: [{ label: o.xLabel }, ...o.series()],
      cursor: {
        y: false, // one line across the plot at the pointer's x; the read-out has the values
        drag: { x: true, y: false, setScale: false },
        bind: {
          dblclick: (_u, _target, handler) => (e) => {
            this.zoom = null;
            handler(e);
            this.zoomChanged();
          },
        },
      },
      hooks: {
        setSelect: [(u) => this.zoomTo(u)],
        setCursor: [(u) => this.showReadout(u)],
        setScale: [(u, key) => key === "x" && this.scaleShown(u)],
        draw: [(u) => o.onDraw?.(u)],
      },
    };
    while (this.data.length < opts.series.length) this.data.push([]);
    this.scales = opts.series.map((s) => s.scale);
    this.u = new uPlot(opts, this.shown(), this.el);
    this.u.over.append(this.readout);
    this.scaleShown(this.u);
    o.onBuild?.(this.u);
  }

  zoomTo(u) {
    const { left, width } = u.select;
    if (width < 3) return;
    const min = u.posToVal(left, "x");
    const max = u.posToVal(left + width, "x");
    u.setSelect({ left: 0, top: 0, width: 0, height: 0 }, false);
    if (!(max > min)) return;
    this.zoom = [min, max];
    u.setScale("x", { min, max });
    this.zoomChanged();
  }

  zoomChanged() {
    this.el.dataset.zoomed = String(!!this.zoom);
    this.resetButton.hidden = !this.zoom;
  }

  scaleShown(u) {
    const { min, max } = u.scales.x;
    if (isNum(min)) this.el.dataset.xMin = String(Number(min.toPrecision(6)));
    if (isNum(max)) this.el.dataset.xMax = String(Number(max.toPrecision(6)));
  }

  /** The values under the pointer, beside it (screen readers have the caption instead). */
  showReadout(u) {
    const i = u.cursor.idx;
    if (i == null || u.cursor.left < 0) {
      this.readout.hidden = true;
      return;
    }
    const rows = [h("div", { class: "readout-x" }, `${this.o.xLabel} ${this.o.fmtX(u.data[0][i])}`)];
    u.series.forEach((s, k) => {
      const v = u.data[k][i];
      if (k === 0 || !s.show || v == null) return;
      const fmt = s.scale === "lr" && !this.o.rightLabel ? (x) => x.toExponential(2) : this.o.fmtY;
      rows.push(h("div", {}, h("span", { class: `swatch ${s.swatch || ""}`, "aria-hidden": "true" }), `${s.label} ${fmt(v)}`));
    });
    this.readout.replaceChildren(...rows);
    this.readout.hidden = false;
    const { left, top } = u.cursor;
    const right = left > u.over.clientWidth / 2;
    this.readout.classList.toggle("left-of-pointer", right);
    this.readout.style.left = `${right ? left - 12 : left + 12}px`;
    this.readout.style.top = `${Math.max(0, top - 10)}px`;
  }
}
