// Dialogs built on <dialog>: modal, keyboard-usable, Escape cancels. A confirmation, and Extend.

import { h } from "./dom.js";

export function confirmDialog(title, text, confirmLabel) {
  return new Promise((resolve) => {
    const yes = h("button", { type: "submit", value: "yes", class: "danger", id: "confirm-yes" }, confirmLabel);
    const no = h("button", { type: "submit", value: "no", class: "secondary", id: "confirm-no", autofocus: true }, "Keep it");
    const dialog = h(
      "dialog",
      { class: "confirm", "aria-labelledby": "confirm-title" },
      h("form", { method: "dialog" }, h("h2", { id: "confirm-title" }, title), h("p", {}, text), h("div", { class: "actions" }, no, yes)),
    );
    dialog.addEventListener("close", () => {
      dialog.remove();
      resolve(dialog.returnValue === "yes");
    });
    document.body.append(dialog);
    dialog.showModal();
  });
}

/**
 * Extend: how many more epochs (or steps, for a task bounded by optim.max_steps) to train.
 * `send(body)` makes the request; its error shows in the dialog, which stays open to fix the number.
 * Resolves with what `send` returned, or null when the dialog was dismissed.
 */
export function extendDialog(task, send) {
  const optim = (task.config && task.config.optim) || {};
  const bySteps = Number(optim.max_steps) > 0;
  const unit = bySteps ? "steps" : "epochs";
  const now = bySteps ? `${Number(optim.max_steps).toLocaleString("en-US")} steps` : `${Number(optim.epochs) || "?"} epochs`;
  return new Promise((resolve) => {
    let result = null;
    const input = h("input", {
      type: "number",
      id: "extend-amount",
      name: unit,
      required: true,
      min: bySteps ? 1 : 0.01,
      step: bySteps ? 1 : "any",
      value: bySteps ? Number(optim.max_steps) : 1,
      inputmode: bySteps ? "numeric" : "decimal",
      "aria-describedby": "extend-help extend-error",
      autofocus: true,
    });
    const error = h("p", { id: "extend-error", class: "error-text", role: "alert", hidden: true });
    const yes = h("button", { type: "submit", id: "extend-yes" }, "Extend");
    const no = h("button", { type: "button", class: "secondary", id: "extend-no", onclick: () => dialog.close() }, "Keep it as is");
    const form = h(
      "form",
      { method: "dialog" },
      h("h2", { id: "extend-title" }, `Train “${task.name || task.id}” further`),
      h("label", { for: "extend-amount" }, `More ${unit}`),
      input,
      h(
        "p",
        { id: "extend-help", class: "help" },
        `It trains for ${now} now. The extra ${unit} run from its final state as attempt ${(task.attempt || 1) + 1}, after waiting in the queue for a slot.`,
      ),
      error,
      h("div", { class: "actions" }, no, yes),
    );
    const dialog = h("dialog", { class: "confirm", id: "extend-dialog", "aria-labelledby": "extend-title" }, form);
    form.addEventListener("submit", async (e) => {
      e.preventDefault();
      yes.disabled = true;
      error.hidden = true;
      try {
        result = await send({ [unit]: Number(input.value) });
        dialog.close();
      } catch (err) {
        error.textContent = err.message;
        error.hidden = false;
        input.setAttribute("aria-invalid", "true");
        input.focus();
      } finally {
        yes.disabled = false;
      }
    });
    dialog.addEventListener("close", () => {
      dialog.remove();
      resolve(result);
    });
    document.body.append(dialog);
    dialog.showModal();
  });
}
