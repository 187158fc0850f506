// The dataset inspector on the New fine-tune form: what the model will learn from the chosen dataset
// (GET /api/datasets/{name}/inspect, with the form's model, method, max_length and held-out prompts):
// the numbers, a histogram of lengths with the max_length cut, the warnings with a button that applies
// each fix, and the rows as the trainer sees them, the tokens that carry the loss highlighted. The studio
// computes everything with the trainer's own code; the page only draws it.

import { api, ApiError } from "./api.js";
import { fmtInt, h } from "./dom.js";

const SVG = "http://www.w3.org/2000/svg";

function svg(tag, attrs = {}, ...children) {
  const el = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) if (v != null) el.setAttribute(k, String(v));
  for (const c of children) el.append(c);
  return el;
}

/** Bars of one or two histograms sharing bins, and a dashed line at `cut` tokens. */
function histogram(series, binWidth, cut, label) {
  const width = 360;
  const height = 90;
  const bins = series[0].counts.length;
  const top = Math.max(1, ...series.flatMap((s) => s.counts));
  const barW = width / bins / series.length;
  const chart = svg("svg", { viewBox: `0 0 ${width} ${height + 14}`, class: "histogram", role: "img", "aria-label": label });
  series.forEach((s, k) =>
    s.counts.forEach((n, i) => {
      if (!n) return;
      const barH = Math.max(1, (n / top) * height);
      const bar = svg("rect", { x: i * barW * series.length + k * barW, y: height - barH, width: Math.max(1, barW - 1), height: barH, class: s.cls });
      bar.append(svg("title", {}, `${s.name}: ${fmtInt(n)} rows of ${fmtInt(i * binWidth)}–${fmtInt((i + 1) * binWidth - 1)} tokens`));
      chart.append(bar);
    }),
  );
  chart.append(
    svg("text", { x: 0, y: height + 12, class: "axis-label" }, "0"),
    svg("text", { x: width, y: height + 12, "text-anchor": "end", class: "axis-label" }, `${fmtInt(binWidth * bins)} tokens`),
  );
  if (cut != null) {
    const x = Math.min(width, (cut / (binWidth * bins)) * width);
    // At the top, beside the line (left of it, or right where it stands near the start): the axis labels below
    // would run into it.
    const left = x > width / 3;
    const place = { x: left ? x - 4 : x + 4, y: 10, "text-anchor": left ? "end" : "start", class: "cut-label" };
    chart.append(svg("line", { x1: x, x2: x, y1: 0, y2: height, class: "cut" }), svg("text", place, `max_length ${fmtInt(cut)}`));
  }
  return chart;
}

function viewText(row) {
  const pre = h("pre", { class: "training-view", tabindex: "0" });
  for (const run of row.runs) {
    if (run.dropped) pre.append(h("span", { class: "dropped", title: "cut off by max_length: never trained on" }, run.text));
    else if (run.trained) pre.append(h("mark", { class: "trained", title: "trained on: these tokens carry the loss" }, run.text));
    else pre.append(run.text);
  }
  return pre;
}

/**
 * The panel, and `show(name, settings)` to fill it for a dataset. `fixes` applies the warnings' fixes:
 * `maxLength(n)` sets data.max_length in the form; `useDataset(name)` picks a new dataset.
 */
export function inspectorPanel(fixes) {
  const el = h("section", { id: "inspector", class: "inspector", "aria-live": "polite", hidden: true });
  let seq = 0;
  let last = "";

  async function show(name, settings, { force = false } = {}) {
    const params = new URLSearchParams();
    for (const [k, v] of Object.entries(settings)) if (v !== "" && v != null) params.set(k, String(v));
    const key = `${name}?${params}`;
    if (key === last && !force) return;
    last = key;
    const mine = ++seq;
    el.hidden = false;
    el.replaceChildren(h("h3", {}, "What the model will learn from it"), h("p", { class: "muted" }, `Reading ${name} as the trainer will…`));
    let r;
    try {
      r = await api(`/api/datasets/${encodeURIComponent(name)}/inspect?${params}`);
    } catch (err) {
      if (mine !== seq) return;
      if (!(err instanceof ApiError)) throw err;
      el.replaceChildren(h("h3", {}, "What the model will learn from it"), h("p", { class: "muted", id: "inspect-error" }, `No inspection until the settings are valid: ${err.message}`));
      return;
    }
    if (mine === seq) render(name, settings, r);
  }

  function render(name, settings, r) {
    const t = r.truncation;
    const d = r.duplicates;
    const lengths = r.lengths;
    const facts = h(
      "ul",
      { class: "inspect-facts" },
      h("li", { id: "inspect-shape" }, `${r.format}, ${fmtInt(r.rows)} rows (${fmtInt(r.usable_rows)} usable, ${fmtInt(r.skipped_rows)} skipped), ${fmtInt(r.cost.tokens_per_epoch)} tokens per epoch`),
      h("li", { id: "inspect-truncation" }, `${fmtInt(t.rows)} rows exceed max_length ${fmtInt(r.max_length)}; ${fmtInt(t.whole_response_lost)} lose their whole response; ${fmtInt(t.response_tokens_lost)} response tokens lost (${(t.share_lost * 100).toFixed(1)}%)`),
      h("li", { id: "inspect-duplicates" }, `${fmtInt(d.exact)} exact duplicates, ${fmtInt(d.near)} near duplicates`),
      ...Object.entries(r.leakage).map(([kind, leak]) =>
        h("li", { id: `inspect-leakage-${kind}` }, `${fmtInt(leak.leaked)} of ${fmtInt(leak.rows)} ${kind === "held_out" ? "held-out prompts" : "validation rows"} appear in the training rows`),
      ),
    );
    const charts = h(
      "div",
      { class: "inspect-charts" },
      h("figure", {}, histogram([{ ...lengths.total.histogram, name: "whole row", cls: "total" }], lengths.total.histogram.bin_width, r.max_length, "Tokens per row, with the max_length cut"), h("figcaption", {}, `Tokens per row (median ${fmtInt(lengths.total.median)}, longest ${fmtInt(lengths.total.max)})`)),
      h(
        "figure",
        {},
        histogram(
          [
            { ...lengths.prompt.histogram, name: "prompt", cls: "prompt" },
            { ...lengths.response.histogram, name: "response", cls: "response" },
          ],
          lengths.prompt.histogram.bin_width,
          r.max_length,
          "Prompt and response tokens per row",
        ),
        h("figcaption", {}, h("span", { class: "key prompt" }, "prompt"), " and ", h("span", { class: "key response" }, "response"), " tokens per row"),
      ),
    );
    const warnings = h("ul", { class: "inspect-warnings", id: "inspect-warnings" }, r.warnings.map((w) => warning(name, settings, w)));
    el.replaceChildren(h("h3", {}, "What the model will learn from it"), facts, charts, warnings, browser(r.view));
  }

  function warning(name, settings, w) {
    const item = h("li", { class: "warn", dataset: { kind: w.kind } }, w.message, " ");
    const fix = (text, run) => {
      const button = h("button", { type: "button", class: "secondary", id: `fix-${w.kind}` }, text);
      button.addEventListener("click", async () => {
        button.disabled = true;
        try {
          await run();
        } catch (err) {
          item.append(h("span", { class: "error-text" }, ` ${err.message}`));
          button.disabled = false;
        }
      });
      return button;
    };
    if (w.kind === "truncation" && w.fix) item.append(fix(`Use max_length ${w.fix["data.max_length"]}`, async () => fixes.maxLength(w.fix["data.max_length"])));
    else if (w.kind === "duplicates") item.append(fix("Drop duplicates into a new dataset", () => derive(name, { drop: "duplicates" })));
    else if (w.kind.startsWith("leakage")) item.append(fix("Remove leaked rows into a new dataset", () => derive(name, { drop: "leaked", eval_prompts: settings.eval_prompts || "", validation: settings.validation || "" })));
    return item;
  }

  async function derive(name, body) {
    const r = await api(`/api/datasets/${encodeURIComponent(name)}/derive`, { method: "POST", json: body });
    fixes.useDataset(r.name, `${r.name}: ${fmtInt(r.kept)} rows kept, ${fmtInt(r.dropped)} dropped; ${name} is unchanged.`);
  }

  function browser(rows) {
    if (!rows.length) return h("p", { class: "muted" }, "No row to show.");
    let i = 0;
    const where = h("span", { id: "view-where" });
    const body = h("div", {});
    const prev = h("button", { type: "button", class: "secondary", id: "view-prev", "aria-label": "Previous row" }, "←");
    const next = h("button", { type: "button", class: "secondary", id: "view-next", "aria-label": "Next row" }, "→");
    const draw = () => {
      const row = rows[i];
      where.textContent = ` Row ${i + 1} of ${rows.length} shown: ${row.where}${row.dropped_tokens ? `, ${fmtInt(row.dropped_tokens)} tokens cut off` : ""} `;
      body.replaceChildren(viewText(row));
      prev.disabled = i === 0;
      next.disabled = i === rows.length - 1;
    };
    prev.addEventListener("click", () => ((i = Math.max(0, i - 1)), draw()));
    next.addEventListener("click", () => ((i = Math.min(rows.length - 1, i + 1)), draw()));
    draw();
    return h(
      "div",
      { class: "inspect-view", id: "training-view" },
      h("h4", {}, "The rows as the trainer sees them"),
      h("p", { class: "muted" }, h("mark", { class: "trained" }, "Highlighted"), " tokens carry the loss; the rest is context; ", h("span", { class: "dropped" }, "struck"), " text is cut off by max_length."),
      h("p", {}, prev, where, next),
      body,
    );
  }

  return { el, show };
}
