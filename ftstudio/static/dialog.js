// A confirmation built on <dialog>: modal, keyboard-usable, Escape cancels.

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
