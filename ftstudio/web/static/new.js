// New fine-tune: model, dataset (upload with preview), preset, and every
// TrainingConfig field under "Advanced". Validation is the API's own: a 422
// comes back with problems naming the config path, shown next to each field.

import { api, ApiError, taskUrl } from "./api.js";
import { h, fmtInt, fmtBytes, isNum } from "./dom.js";
import { inspectorPanel } from "./inspect.js";
import { timingBox } from "./timing.js";

export const MAX_UPLOAD_BYTES = 512 * 1024 * 1024;
const UPLOAD_TYPES = [".json", ".jsonl", ".csv", ".parquet", ".txt"];
// Shown in the main section, so not repeated under Advanced.
const MAIN_FIELDS = new Set(["model.name", "data.path", "preset", "method"]);
// What each training method is, in the form's words (the choices themselves come from the config's fields).
const METHOD_WORDS = {
  sft: "Supervised fine-tuning: instructions or conversations, trained on the answers",
  pretrain: "Continued pre-training: raw text (a text column or .txt files), trained on every token",
  dpo: "DPO (or IPO, SimPO): preference pairs, the chosen reply made likelier than the rejected one",
  orpo: "ORPO: preference pairs, SFT and preference in one loss, no reference model",
  kto: "KTO: replies labelled good or bad, paired or not",
  grpo: "GRPO: prompts, each answered several times and scored by reward functions",
};
// The data each method starts from, unless the person picked other data: the built-in set of its shape.
const METHOD_DATA = { dpo: "builtin:preferences", orpo: "builtin:preferences", kto: "builtin:preferences", grpo: "builtin:math" };
const DEFAULT_DATA = "builtin:sample";
const GRPO_REWARDS = "numeric"; // config.GRPO_REWARDS: what a grpo run scores when none are given

const fieldId = (path) => `cfg-${path.replace(/[^a-zA-Z0-9_-]/g, "-")}`;

export function mountNew(root, params = new URLSearchParams()) {
  let destroyed = false;
  let fields = [];
  let presets = {};
  const controls = new Map(); // config path -> {input, field, error, dirty}
  const datasets = new Map();

  const summary = h("div", { class: "error-summary", role: "alert", tabindex: "-1", hidden: true });

  // Going on from a completed task's adapter (#/new?from=ID): the studio resolves the id (model.start_from).
  let startFrom = (params.get("from") || "").trim();
  const startNotice = h("div", { class: "notice", id: "start-from", role: "status", hidden: !startFrom });

  // name
  const nameInput = h("input", { id: "task-name", name: "name", autocomplete: "off", placeholder: "optional, e.g. support-bot-v2" });

  // model
  const modelList = h("datalist", { id: "model-options" });
  const modelInput = h("input", {
    id: "model-name",
    name: "model.name",
    list: "model-options",
    required: true,
    autocomplete: "off",
    spellcheck: "false",
    value: "builtin:tiny",
  });
  const modelPicks = h("div", { class: "chips", role: "group", "aria-label": "Built-in and recent models" });

  // dataset
  const dataList = h("datalist", { id: "dataset-options" });
  const dataInput = h("input", {
    id: "dataset-name",
    name: "data.path",
    list: "dataset-options",
    required: true,
    autocomplete: "off",
    spellcheck: "false",
    value: DEFAULT_DATA,
    oninput: () => ((dataInput.dataset.touched = "1"), showDatasetInfo()),
  });
  const dataPicks = h("div", { class: "chips", role: "group", "aria-label": "Datasets you can pick" });
  const fileInput = h("input", { id: "dataset-file", type: "file", accept: UPLOAD_TYPES.join(","), onchange: () => upload() });
  const uploadStatus = h("p", { id: "upload-status", class: "muted", "aria-live": "polite" });
  const uploadError = h("p", { id: "upload-error", class: "error-text", role: "alert", hidden: true });
  const preview = h("div", { id: "dataset-preview", class: "preview" });
  // The inspector's fixes change the form, never the chosen file: a new max_length, or a new dataset.
  const inspector = inspectorPanel({
    maxLength(n) {
      const entry = controls.get("data.max_length");
      if (!entry) return;
      write(entry, String(n));
      entry.dirty = read(entry) !== entry.baseline;
      entry.input.dispatchEvent(new Event("input", { bubbles: true }));
    },
    useDataset(name, note) {
      uploadStatus.textContent = note;
      dataInput.value = name;
      dataInput.dataset.touched = "1";
      api("/api/datasets").then((d) => !destroyed && fillDatasets(d.datasets || []), () => {});
      inspectSoon();
    },
  });

  const methodSelect = h("select", { id: "method", name: "method", onchange: () => methodChanged() }, h("option", { value: "sft" }, METHOD_WORDS.sft));

  // preset
  const presetSelect = h("select", { id: "preset", name: "preset", onchange: () => applyPreset() }, h("option", { value: "" }, "none (defaults)"));

  const advanced = h("div", { class: "advanced-fields" }, h("p", { class: "muted" }, "Loading settings…"));
  const advancedBox = h(
    "details",
    { id: "advanced", class: "advanced" },
    h("summary", {}, "Advanced settings"),
    h("p", { class: "muted" }, "Every training setting, filled from the preset. Change any; only changed values are sent on top of the preset."),
    advanced,
  );
  // The run's peak memory against this machine's, recounted as the settings change (POST /api/tasks/estimate).
  const memoryBox = h("p", { id: "memory-estimate", class: "memory-estimate muted", role: "status", "aria-live": "polite" }, "Counting the memory this run needs…");
  // The time per epoch, as timed for these settings on the studio's machine (timing.js).
  const timing = timingBox(() => payload(), () => destroyed);
  const submit = h("button", { type: "submit", id: "start-button" }, "Start fine-tune");
  const submitNote = h("span", { class: "muted", "aria-live": "polite" });

  const errFor = (id) => h("p", { class: "field-error", id: `${id}-error`, hidden: true });
  const mainErrors = {
    name: errFor("task-name"),
    "model.name": errFor("model-name"),
    "data.path": errFor("dataset-name"),
    preset: errFor("preset"),
    method: errFor("method"),
  };
  nameInput.setAttribute("aria-describedby", "task-name-error");
  modelInput.setAttribute("aria-describedby", "model-name-help model-name-error");
  dataInput.setAttribute("aria-describedby", "dataset-name-help dataset-name-error");
  presetSelect.setAttribute("aria-describedby", "preset-help preset-error");
  methodSelect.setAttribute("aria-describedby", "method-help method-error");

  const form = h(
    "form",
    { id: "new-form", novalidate: true, onsubmit: (e) => (e.preventDefault(), start()) },
    summary,
    startNotice,
    h("div", { class: "field" }, h("label", { for: "task-name" }, "Name"), nameInput, mainErrors.name),
    h(
      "div",
      { class: "field" },
      h("label", { for: "method" }, "Method"),
      methodSelect,
      h("p", { class: "help", id: "method-help" }, "What the run learns from its data. Continued pre-training packs raw text and needs no chat template; DPO, ORPO and KTO learn which of two replies is better (builtin:preferences is a small set to try); GRPO learns what its rewards score (builtin:math, with the numeric reward)."),
      mainErrors.method,
    ),
    h(
      "fieldset",
      {},
      h("legend", {}, "Base model"),
      h("label", { for: "model-name" }, "Model"),
      modelInput,
      modelList,
      h("p", { class: "help", id: "model-name-help" }, "A Hugging Face hub id (org/name), a local directory, or builtin:tiny (no download, runs on a CPU)."),
      modelPicks,
      mainErrors["model.name"],
    ),
    h(
      "fieldset",
      {},
      h("legend", {}, "Dataset"),
      h("label", { for: "dataset-name" }, "Dataset"),
      dataInput,
      dataList,
      h("p", { class: "help", id: "dataset-name-help" }, "builtin:sample, an uploaded dataset, or a .json/.jsonl/.csv/.parquet (or .txt, for pretrain) path on the studio's machine."),
      dataPicks,
      mainErrors["data.path"],
      h("label", { for: "dataset-file" }, `Upload a file (${UPLOAD_TYPES.join(", ")}; up to ${fmtBytes(MAX_UPLOAD_BYTES)})`),
      fileInput,
      uploadStatus,
      uploadError,
      preview,
      inspector.el,
    ),
    h(
      "div",
      { class: "field" },
      h("label", { for: "preset" }, "Preset"),
      presetSelect,
      h("p", { class: "help", id: "preset-help" }, "A starting point for the settings below: cpu-demo for a laptop without a GPU."),
      mainErrors.preset,
    ),
    advancedBox,
    memoryBox,
    timing.el,
    h("div", { class: "actions" }, submit, submitNote),
  );

  root.append(
    h(
      "section",
      { "aria-labelledby": "new-title" },
      h("div", { class: "title-row" }, h("h1", { id: "new-title", tabindex: "-1" }, "New fine-tune")),
      form,
    ),
  );

  init();

  async function init() {
    const [f, p, m, d] = await Promise.allSettled([
      api("/api/config/fields"),
      api("/api/config/presets"),
      api("/api/models"),
      api("/api/datasets"),
    ]);
    if (destroyed) return;
    if (p.status === "fulfilled" && p.value && typeof p.value === "object") {
      presets = p.value.presets && typeof p.value.presets === "object" ? p.value.presets : p.value;
      for (const name of Object.keys(presets)) presetSelect.append(h("option", { value: name }, name));
      if ("cpu-demo" in presets) presetSelect.value = "cpu-demo";
    }
    if (m.status === "fulfilled") fillModels(m.value?.models || []);
    if (d.status === "fulfilled") fillDatasets(d.value?.datasets || []);
    if (f.status === "fulfilled") {
      fields = Array.isArray(f.value) ? f.value : f.value?.fields || [];
      const methods = fields.find((x) => x.path === "method")?.choices || [];
      if (methods.length) methodSelect.replaceChildren(...methods.map((m) => h("option", { value: m }, METHOD_WORDS[m] || m)));
      buildAdvanced();
      applyPreset();
      if (startFrom) await showStartFrom();
      methodChanged();
      estimateSoon();
    } else {
      advanced.replaceChildren(h("p", { class: "error-text" }, `Could not load the settings: ${f.reason.message}`));
    }
  }

  function fillModels(models) {
    modelList.replaceChildren(...models.map((m) => h("option", { value: m.name }, m.builtin ? "built-in" : "recently used")));
    modelPicks.replaceChildren(
      ...models.slice(0, 8).map((m) =>
        h("button", { type: "button", class: "chip", onclick: () => ((modelInput.value = m.name), modelInput.focus()) }, m.name),
      ),
    );
  }

  function fillDatasets(list) {
    datasets.clear();
    for (const d of list) datasets.set(d.name, d);
    const describe = (d) =>
      [d.builtin ? "built-in" : "uploaded", d.format, isNum(d.rows) ? `${fmtInt(d.rows)} rows` : "", isNum(d.size) ? fmtBytes(d.size) : ""].filter(Boolean).join(", ");
    dataList.replaceChildren(...list.map((d) => h("option", { value: d.name }, describe(d))));
    dataPicks.replaceChildren(
      ...list.slice(0, 12).map((d) =>
        h("button", { type: "button", class: "chip", title: describe(d), onclick: () => ((dataInput.value = d.name), (dataInput.dataset.touched = "1"), showDatasetInfo(), dataInput.focus()) }, d.name),
      ),
    );
    showDatasetInfo();
  }

  function showDatasetInfo() {
    const d = datasets.get(dataInput.value.trim());
    if (!d) return;
    if (preview.dataset.name === d.name) return;
    preview.dataset.name = "";
    preview.replaceChildren(
      h(
        "p",
        {},
        h("strong", {}, d.name),
        d.builtin ? " (built-in)" : " (uploaded)",
        d.format ? `, format ${d.format}` : "",
        isNum(d.rows) ? `, ${fmtInt(d.rows)} rows` : "",
        isNum(d.size) ? `, ${fmtBytes(d.size)}` : "",
      ),
    );
    inspectSoon();
    // Then the same preview an upload shows: detected format, row count, first rows.
    const name = d.name;
    api(`/api/datasets/${encodeURIComponent(name)}`).then(
      (info) => !destroyed && dataInput.value.trim() === name && renderPreview(info),
      () => {},
    );
  }

  async function upload() {
    const file = fileInput.files && fileInput.files[0];
    uploadError.hidden = true;
    if (!file) return;
    const lower = file.name.toLowerCase();
    if (!UPLOAD_TYPES.some((ext) => lower.endsWith(ext))) return uploadFailed(`${file.name}: choose a ${UPLOAD_TYPES.join(", ")} file.`);
    if (file.size > MAX_UPLOAD_BYTES) return uploadFailed(`${file.name} is ${fmtBytes(file.size)}; the limit is ${fmtBytes(MAX_UPLOAD_BYTES)}.`);
    uploadStatus.textContent = `Uploading ${file.name} (${fmtBytes(file.size)})…`;
    const body = new FormData();
    body.append("file", file, file.name);
    try {
      const r = await api("/api/datasets", { method: "POST", form: body });
      if (destroyed) return;
      uploadStatus.textContent = `Uploaded ${r.name}.`;
      dataInput.value = r.name;
      dataInput.dataset.touched = "1";
      renderPreview(r);
      api("/api/datasets").then((d) => !destroyed && (fillDatasets(d.datasets || []), inspectSoon()), () => {});
    } catch (err) {
      uploadFailed(err.message);
    } finally {
      fileInput.value = "";
    }
  }

  function uploadFailed(message) {
    uploadStatus.textContent = "";
    uploadError.textContent = `Upload failed: ${message}`;
    uploadError.hidden = false;
  }

  function renderPreview(r) {
    const rows = Array.isArray(r.preview) ? r.preview.slice(0, 5) : [];
    preview.dataset.name = r.name;
    const cols = [];
    for (const row of rows) if (row && typeof row === "object") for (const k of Object.keys(row)) if (!cols.includes(k)) cols.push(k);
    const cellText = (v) => {
      // A chat (messages / sharegpt) reads better as "role: text" turns than as JSON.
      const turns = Array.isArray(v) && v.every((m) => m && typeof m === "object" && ("content" in m || "value" in m));
      const t = typeof v === "string" ? v : turns ? v.map((m) => `${m.role ?? m.from ?? "?"}: ${m.content ?? m.value}`).join(" ⏎ ") : JSON.stringify(v);
      return t && t.length > 240 ? `${t.slice(0, 240)}…` : t ?? "";
    };
    preview.replaceChildren(
      h("p", {}, h("strong", {}, r.name), ` — detected format `, h("strong", { id: "detected-format" }, r.format || "?"), `, ${fmtInt(r.rows)} rows`),
      rows.length
        ? h(
            "div",
            { class: "table-wrap" },
            h(
              "table",
              { class: "preview-table" },
              h("caption", {}, `First ${rows.length} rows`),
              h("thead", {}, h("tr", {}, cols.slice(0, 8).map((c) => h("th", { scope: "col" }, c)))),
              h(
                "tbody",
                {},
                rows.map((row) => h("tr", {}, cols.slice(0, 8).map((c) => h("td", {}, cellText(row && typeof row === "object" ? row[c] : row))))),
              ),
            ),
          )
        : null,
    );
  }

  function buildAdvanced() {
    const sections = new Map();
    for (const f of fields) {
      if (MAIN_FIELDS.has(f.path)) continue;
      const section = f.path.includes(".") ? f.path.split(".")[0] : "general";
      if (!sections.has(section)) sections.set(section, []);
      sections.get(section).push(f);
    }
    advanced.replaceChildren(
      ...[...sections].map(([section, list]) => h("fieldset", { class: "section" }, h("legend", {}, section), list.map(fieldControl))),
    );
  }

  /** The task this one goes on from: its name and model, said in the notice; the model follows it, and a run
   * that goes on from an SFT adapter is most often DPO. */
  async function showStartFrom() {
    let t = null;
    try {
      t = await api(taskUrl(startFrom));
    } catch (err) {
      startNotice.replaceChildren(`Task ${startFrom} was not found (${err.message}); this fine-tune starts a new adapter.`);
      startFrom = "";
      return;
    }
    if (destroyed) return;
    const model = t?.config?.model?.name || t?.model || "";
    if (model) {
      modelInput.value = model;
      modelInput.dataset.touched = "1";
    }
    if ((t?.config?.method || "sft") === "sft" && methodSelect.querySelector('option[value="dpo"]')) methodSelect.value = "dpo";
    startNotice.replaceChildren(
      h("strong", {}, "Going on from the adapter of "),
      h("a", { href: `#/tasks/${encodeURIComponent(startFrom)}` }, t?.name || startFrom),
      ` (${t?.config?.method || "sft"} on ${model || "its model"}): that adapter trains further, with its own rank and kind, so the LoRA settings below are not used. `,
      h(
        "button",
        {
          type: "button",
          class: "secondary small-button",
          onclick: () => {
            startFrom = "";
            startNotice.hidden = true;
          },
        },
        "Start a new adapter instead",
      ),
    );
  }

  /** Show only the settings the chosen method reads (a field's `methods`; none listed: every method), and a
   * section only while one of its settings shows. The data set follows the method while nobody picked one. */
  function methodChanged() {
    const method = methodSelect.value || "sft";
    for (const entry of controls.values()) {
      const only = entry.field.methods || [];
      entry.row.hidden = only.length > 0 && !only.includes(method);
    }
    for (const set of advanced.querySelectorAll("fieldset.section")) {
      set.hidden = [...set.querySelectorAll(".field")].every((el) => el.hidden);
    }
    // grpo's rewards start as the studio's default for it, shown, and sent only when changed.
    const rewards = controls.get("rewards");
    if (rewards && !rewards.dirty) {
      rewards.baseline = method === "grpo" ? GRPO_REWARDS : "";
      write(rewards, rewards.baseline);
    }
    if (!dataInput.dataset.touched) {
      dataInput.value = METHOD_DATA[method] || DEFAULT_DATA;
      showDatasetInfo();
    }
  }

  function fieldControl(f) {
    const id = fieldId(f.path);
    const name = f.path.split(".").pop();
    let input;
    if (f.type === "bool") {
      input = h("input", { type: "checkbox", id, name: f.path });
    } else if (f.path === "rewards") {
      // One reward a line: a regex:PATTERN reward may hold commas, which a comma-separated field would cut.
      input = h("textarea", { id, name: f.path, rows: 2, spellcheck: "false", placeholder: "one a line, e.g. numeric" });
    } else if (f.type === "choice") {
      input = h("select", { id, name: f.path }, (f.choices || []).map((c) => h("option", { value: String(c) }, String(c))));
    } else {
      const numeric = f.type === "int" || f.type === "float";
      input = h("input", {
        id,
        name: f.path,
        autocomplete: "off",
        spellcheck: "false",
        inputmode: numeric ? (f.type === "int" ? "numeric" : "decimal") : null,
        placeholder: f.type === "list" ? "comma-separated" : null,
        maxlength: f.type === "str" && f.max_length ? f.max_length : null,
      });
    }
    // The server's bounds, said beside the field so nobody has to submit to learn them.
    const help = h("p", { class: "help", id: `${id}-help` }, f.help || "", f.range ? ` Range: ${f.range}.` : "");
    const error = h("p", { class: "field-error", id: `${id}-error`, hidden: true });
    input.setAttribute("aria-describedby", `${id}-help ${id}-error`);
    const entry = { input, field: f, error, dirty: false, baseline: null };
    input.addEventListener(f.type === "bool" || f.type === "choice" ? "change" : "input", () => {
      entry.dirty = read(entry) !== entry.baseline;
    });
    controls.set(f.path, entry);
    const label = h("label", { for: id }, h("code", {}, name), f.flag ? h("span", { class: "muted" }, ` ${f.flag}`) : null);
    entry.row = h("div", { class: `field ${f.type === "bool" ? "check" : ""}`, dataset: { path: f.path } }, label, input, help, error);
    return entry.row;
  }

  function baselineValue(path, fallback) {
    const preset = presets[presetSelect.value] || {};
    let v = preset;
    for (const part of path.split(".")) v = v && typeof v === "object" ? v[part] : undefined;
    return v === undefined ? fallback : v;
  }

  function applyPreset() {
    for (const entry of controls.values()) {
      const value = baselineValue(entry.field.path, entry.field.default);
      entry.baseline = show(value, entry.field);
      if (!entry.dirty) write(entry, entry.baseline);
    }
    const presetModel = baselineValue("model.name", null);
    if (presetModel && !modelInput.dataset.touched) modelInput.value = presetModel;
  }
  modelInput.addEventListener("input", () => (modelInput.dataset.touched = "1"));

  function show(value, f) {
    if (f.type === "bool") return value ? "true" : "false";
    if (Array.isArray(value)) return value.join(f.path === "rewards" ? "\n" : ", ");
    return value == null ? "" : String(value);
  }
  function read(entry) {
    const el = entry.input;
    return entry.field.type === "bool" ? (el.checked ? "true" : "false") : el.value;
  }
  function write(entry, text) {
    if (entry.field.type === "bool") entry.input.checked = text === "true";
    else entry.input.value = text;
  }
  // What we send: a number where the text is one, else the text as typed, so the API's validation names it.
  function value(entry) {
    const text = read(entry);
    const t = entry.field.type;
    if (t === "bool") return text === "true";
    if (entry.field.path === "rewards") return text.split("\n").map((r) => r.trim()).filter(Boolean);
    if ((t === "int" || t === "float") && text.trim() !== "" && Number.isFinite(Number(text))) return Number(text);
    return text;
  }

  function payload() {
    const config = {};
    if (presetSelect.value) config.preset = presetSelect.value;
    if (methodSelect.value && methodSelect.value !== "sft") config.method = methodSelect.value;
    if (startFrom) config.model = { ...(config.model || {}), start_from: startFrom };
    const set = (path, v) => {
      const parts = path.split(".");
      let o = config;
      for (const p of parts.slice(0, -1)) o = o[p] ??= {};
      o[parts[parts.length - 1]] = v;
    };
    set("model.name", modelInput.value.trim());
    set("data.path", dataInput.value.trim());
    for (const [path, entry] of controls) if (read(entry) !== entry.baseline) set(path, value(entry));
    const body = { config };
    if (nameInput.value.trim()) body.name = nameInput.value.trim();
    return body;
  }

  function clearErrors() {
    summary.hidden = true;
    summary.replaceChildren();
    const all = [...Object.values(mainErrors), ...[...controls.values()].map((c) => c.error)];
    for (const e of all) {
      e.hidden = true;
      e.textContent = "";
    }
    for (const el of form.querySelectorAll("[aria-invalid]")) el.removeAttribute("aria-invalid");
  }

  function showProblems(err) {
    const items = [];
    const problems = err.problems && err.problems.length ? err.problems : [{ field: "", message: err.detail }];
    for (const p of problems) {
      const path = String(p.field || "").split(" ")[0].replace(/^config\./, "");
      let target = null;
      let errEl = mainErrors[path];
      if (errEl) {
        target = { name: nameInput, "model.name": modelInput, "data.path": dataInput, preset: presetSelect, method: methodSelect }[path];
      } else if (controls.has(path)) {
        const c = controls.get(path);
        errEl = c.error;
        target = c.input;
        advancedBox.open = true;
      }
      if (errEl) {
        errEl.textContent = errEl.textContent ? `${errEl.textContent} ${p.message}` : p.message;
        errEl.hidden = false;
        target.setAttribute("aria-invalid", "true");
      }
      const text = p.field ? `${p.field}: ${p.message}` : p.message;
      items.push(h("li", {}, target ? h("a", { href: `#${target.id}`, onclick: (e) => (e.preventDefault(), target.focus()) }, text) : text));
    }
    summary.replaceChildren(
      h("p", {}, h("strong", {}, problems.length > 1 ? `Fix these ${problems.length} problems to start:` : "Fix this to start:")),
      h("ul", {}, items),
    );
    summary.hidden = false;
    summary.focus();
  }

  let estimateTimer = 0;
  let estimateSeq = 0;
  function estimateSoon() {
    clearTimeout(estimateTimer);
    estimateTimer = setTimeout(() => (estimateMemory(), timing.refresh()), 300);
  }
  async function estimateMemory() {
    const seq = ++estimateSeq;
    let text;
    let tight = false;
    try {
      const r = await api("/api/tasks/estimate", { method: "POST", json: payload() });
      const m = r.memory;
      if (!m) text = "No memory estimate: the model's config.json is not on the studio's machine to count from.";
      else {
        text = `Memory: ${m.line}.`;
        tight = !m.fits;
        if (tight && !m.suggest_batch) text += " Lower data.max_length, or turn on model.gradient_checkpointing.";
      }
    } catch (err) {
      if (!(err instanceof ApiError)) throw err;
      text = "No memory estimate until the settings are valid.";
    }
    if (destroyed || seq !== estimateSeq) return; // a newer count is on its way
    memoryBox.textContent = text;
    memoryBox.classList.toggle("warn", tight);
    memoryBox.classList.toggle("muted", !tight);
  }
  form.addEventListener("input", estimateSoon);
  form.addEventListener("change", estimateSoon);

  // The inspector follows the dataset and the settings that change what it reports.
  let inspectTimer = 0;
  function inspectSoon() {
    clearTimeout(inspectTimer);
    inspectTimer = setTimeout(() => {
      const name = dataInput.value.trim();
      if (destroyed || !datasets.has(name)) return; // only a bundled or uploaded dataset: the API reads no other
      const field = (path) => (controls.has(path) ? read(controls.get(path)).trim() : "");
      const validation = field("data.validation");
      inspector.show(name, {
        model: modelInput.value.trim(),
        method: methodSelect.value || "sft",
        max_length: field("data.max_length"),
        format: field("data.format"),
        eval_prompts: field("evaluation.prompts"),
        validation: validation && !Number.isFinite(Number(validation)) ? validation : "",
      });
    }, 400);
  }
  form.addEventListener("input", inspectSoon);
  form.addEventListener("change", inspectSoon);
  form.addEventListener("click", (e) => e.target.closest && e.target.closest(".chip") && estimateSoon());

  async function start() {
    clearErrors();
    submit.disabled = true;
    submitNote.textContent = "Starting…";
    try {
      const task = await api("/api/tasks", { method: "POST", json: payload() });
      if (destroyed) return;
      location.hash = `#/tasks/${encodeURIComponent(task.id)}`;
    } catch (err) {
      if (destroyed) return;
      submitNote.textContent = "";
      if (err instanceof ApiError) showProblems(err);
      else throw err;
    } finally {
      submit.disabled = false;
      if (submitNote.textContent === "Starting…") submitNote.textContent = "";
    }
  }

  return {
    destroy() {
      destroyed = true;
    },
  };
}
