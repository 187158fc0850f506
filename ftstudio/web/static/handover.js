// "Use it": for a completed task, ready-to-copy ways to load the result in the tools people
// serve with (peft, vLLM, Ollama) and to export it as a folder. The commands come from the
// studio (GET /api/tasks/{id}/handover), which knows the paths; the page only shows them.

import { api, taskUrl } from "./api.js";
import { h } from "./dom.js";

const BLOCKS = [
  ["peft", "Python (peft)", (r) => r.peft],
  ["vllm", "vLLM", (r) => r.vllm],
  ["ollama", "Ollama: a Modelfile, then the command", (r) => `${r.ollama_modelfile}\n\n# then, in the folder of that Modelfile:\n# ${r.ollama}`],
  ["export", "A folder that stands on its own, with a model card", (r) => `${r.export_adapter}\n${r.export_merged}`],
];

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
    );
  } catch (err) {
    panel.append(h("p", { class: "error-text" }, `Could not show how to use it: ${err.message}`));
  }
  return panel;
}
