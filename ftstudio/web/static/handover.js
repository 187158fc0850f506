// "Use it": for a completed task, ready-to-copy ways to load the result in the tools people
// serve with (peft, vLLM, Ollama) and to export it as a folder. The commands come from the
// studio (GET /api/tasks/{id}/handover), which knows the paths; the page only shows them.
// The GGUF section starts an export job (POST /api/tasks/{id}/exports), follows its progress line
// while it runs, offers to cancel it, and then lists its files with size and sha256 to download.

import { api, downloadLink, taskUrl } from "./api.js";
import { fmtBytes, h } from "./dom.js";

const BLOCKS = [
  ["peft", "Python (peft)", (r) => r.peft],
  ["vllm", "vLLM", (r) => r.vllm],
  ["ollama", "Ollama: a Modelfile, then the command", (r) => `${r.ollama_modelfile}\n\n# then, in the folder of that Modelfile:\n# ${r.ollama}`],
  ["export", "A folder that stands on its own, with a model card", (r) => `${r.export_adapter}\n${r.export_merged}`],
  ["gguf", "GGUF for llama.cpp, Ollama and LM Studio", (r) => r.gguf],
];
const QUANTS = [
  ["q4_k_m", "q4_k_m: a third of f16, the usual choice"],
  ["q8_0", "q8_0: half of f16, all but identical answers"],
  ["f16", "f16: as trained"],
];
const POLL_MS = 1000;

function copyButton(pre, label) {
  const button = h("button", { type: "button", class: "copy", "aria-label": `Copy the ${label} commands` }, "Copy");
  button.addEventListener("click", async () => {
    try {
      await navigator.clipboard.writeText(pre.textContent);
      button.textContent = "Copied";
    } catch {
      // No clipboard here (an insecure origin, a refused permission): select it for Ctrl+C instead.
      const range = document.createRange();
      range.selectNodeContents(pre);
      const sel = window.getSelection();
      sel.removeAllRanges();
      sel.addRange(range);
      button.textContent = "Selected: press Ctrl+C";
    }
    setTimeout(() => (button.textContent = "Copy"), 2500);
  });
  return button;
}

function exportRow(taskId, job, refresh) {
  const live = job.status === "queued" || job.status === "running";
  const row = h("li", { class: "export-job", "data-status": job.status, id: `export-${job.id}` },
    h("strong", {}, job.quant), " ",
    h("span", { class: `badge ${job.status}` }, job.status), " ",
    h("span", { class: "muted export-progress" }, job.status === "failed" ? "" : job.progress || ""),
  );
  if (job.error) row.append(h("div", { class: "error-text" }, job.error));
  if (live) {
    const cancel = h("button", { type: "button", class: "secondary", id: `cancel-export-${job.id}` }, "Cancel");
    cancel.addEventListener("click", async () => {
      cancel.disabled = true;
      try {
        await api(taskUrl(taskId, `/exports/${job.id}/cancel`), { method: "POST" });
      } catch (err) {
        row.append(h("div", { class: "error-text" }, err.message));
      }
      refresh();
    });
    row.append(" ", cancel);
  }
  if (job.status === "completed") {
    const share = job.agreement?.top1_agreement;
    if (typeof share === "number") row.append(h("span", { class: "muted" }, ` agrees with the original on ${(share * 100).toFixed(1)}% of next tokens`));
    row.append(
      h("ul", { class: "files" }, job.files.map((f) =>
        h("li", {},
          downloadLink(f.url, f.name, f.name, { class: "export-file" }),
          h("span", { class: "muted" }, ` ${fmtBytes(f.bytes)}`),
          f.sha256 ? h("code", { class: "sha256", title: "sha256" }, ` sha256 ${f.sha256}`) : "",
        ))),
    );
  }
  return row;
}

/** The GGUF section: start an export job, follow it, download what it wrote. */
function ggufSection(taskId) {
  const list = h("ul", { class: "exports", id: "gguf-exports" });
  const error = h("p", { class: "error-text", id: "gguf-error" });
  const select = h("select", { id: "gguf-quant", "aria-label": "Quantization" }, QUANTS.map(([v, t]) => h("option", { value: v }, t)));
  const start = h("button", { type: "button", id: "gguf-start" }, "Export GGUF");
  let timer = null;
  async function refresh() {
    clearTimeout(timer);
    if (list.dataset.shown && !list.isConnected) return; // the task view was left: stop following
    try {
      const { exports } = await api(taskUrl(taskId, "/exports"));
      list.replaceChildren(...exports.map((job) => exportRow(taskId, job, refresh)));
      list.dataset.shown = "1";
      if (exports.some((j) => j.status === "queued" || j.status === "running")) timer = setTimeout(refresh, POLL_MS);
    } catch (err) {
      error.textContent = `Could not list the exports: ${err.message}`;
    }
  }
  start.addEventListener("click", async () => {
    error.textContent = "";
    start.disabled = true;
    try {
      await api(taskUrl(taskId, "/exports"), { method: "POST", json: { format: "gguf", quant: select.value } });
    } catch (err) {
      error.textContent = err.message;
    }
    start.disabled = false;
    refresh();
  });
  refresh();
  return h("div", { class: "handover-block", id: "gguf-section" },
    h("div", { class: "handover-head" }, h("h3", {}, "Export GGUF here")),
    h("p", { class: "muted" }, "One file for llama.cpp, Ollama and LM Studio, with a Modelfile, written by llama.cpp's own converter as a job beside training."),
    h("p", {}, select, " ", start), error, list);
}

/** The "Use it" panel for a completed task: its element, filled when the studio answers. */
export async function handoverPanel(taskId) {
  const panel = h("div", { id: "handover" });
  try {
    const r = await api(taskUrl(taskId, "/handover"));
    panel.append(
      h("p", { class: "muted" }, `Load the adapter `, h("code", {}, r.name), ` on top of `, h("code", {}, r.base), `:`),
      ...BLOCKS.map(([id, label, text]) => {
        const pre = h("pre", { class: "handover", id: `handover-${id}`, tabindex: "0" }, text(r));
        return h("div", { class: "handover-block" }, h("div", { class: "handover-head" }, h("h3", {}, label), copyButton(pre, label)), pre);
      }),
      ggufSection(taskId),
    );
  } catch (err) {
    panel.append(h("p", { class: "error-text" }, `Could not show how to use it: ${err.message}`));
  }
  return panel;
}
