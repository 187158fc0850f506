// Held-out prompts: how the fine-tune and its base model answered the prompts of
// evaluation.prompts, at the end of training and (with evaluation.at_checkpoints) after
// each checkpoint, from GET /api/tasks/{id}/samples. Every answer goes in as text.

import { api, taskUrl } from "./api.js";
import { h, setText, fmtInt } from "./dom.js";

export class HeldOutPanel {
  constructor(taskId) {
    this.taskId = taskId;
    this.stages = [];
    this.pending = null;
    this.again = false;
    this.destroyed = false;
    // The newest stage is shown until the person picks another; a new stage then does not take the table away.
    this.followNewest = true;
    this.picker = h("select", { id: "heldout-stage", onchange: () => this.pick() });
    this.note = h("p", { class: "muted", id: "heldout-note" });
    this.body = h("tbody");
    this.table = h(
      "table",
      { class: "heldout", id: "heldout-table" },
      h("thead", {}, h("tr", {}, ["Prompt", "Expected", "Fine-tuned", "Base model"].map((t) => h("th", { scope: "col" }, t)))),
      this.body,
    );
    this.el = h(
      "div",
      { id: "heldout" },
      h("p", { class: "heldout-controls" }, h("label", { for: "heldout-stage" }, "Answers at "), this.picker),
      this.note,
      h("div", { class: "table-wrap" }, this.table),
    );
  }

  /** Fetch the stages again; resolves to how many there are. Calls that come while one runs are folded into one more. */
  async load() {
    if (this.pending) {
      this.again = true;
      return this.pending;
    }
    this.pending = (async () => {
      do {
        this.again = false;
        const r = await api(taskUrl(this.taskId, "/samples"));
        if (this.destroyed) return 0;
        this.update((r && r.stages) || []);
      } while (this.again && !this.destroyed);
      return this.stages.length;
    })();
    try {
      return await this.pending;
    } finally {
      this.pending = null;
    }
  }

  update(stages) {
    const chosen = this.picker.value;
    this.stages = stages;
    this.picker.replaceChildren(...stages.map((s) => h("option", { value: s.stage }, stageLabel(s))));
    const newest = stages.length ? stages[stages.length - 1].stage : "";
    this.picker.value = this.followNewest || !stages.some((s) => s.stage === chosen) ? newest : chosen;
    this.render();
  }

  pick() {
    this.followNewest = this.picker.selectedIndex === this.stages.length - 1;
    this.render();
  }

  render() {
    const stage = this.stages.find((s) => s.stage === this.picker.value);
    if (!stage) {
      this.body.replaceChildren();
      setText(this.note, "");
      return;
    }
    const samples = stage.samples || [];
    const took = Number.isFinite(stage.seconds) ? `, answered in ${stage.seconds.toFixed(1)} s` : "";
    const limit = Number.isFinite(stage.max_new_tokens) ? `; at most ${fmtInt(stage.max_new_tokens)} new tokens each, greedy` : "";
    setText(this.note, `${samples.length} prompt${samples.length === 1 ? "" : "s"} at step ${fmtInt(stage.step)}${limit}${took}.`);
    this.body.replaceChildren(
      ...samples.map((s) =>
        h(
          "tr",
          {},
          h("td", { class: "heldout-prompt" }, s.prompt),
          s.reference == null ? h("td", { class: "heldout-ref muted" }, "–") : h("td", { class: "heldout-ref" }, s.reference),
          h("td", { class: "heldout-answer", dataset: { who: "adapter" } }, s.adapter),
          h("td", { class: "heldout-answer", dataset: { who: "base" } }, s.base),
        ),
      ),
    );
  }

  destroy() {
    this.destroyed = true;
  }
}

function stageLabel(s) {
  return s.stage === "final" ? `the end of training (step ${fmtInt(s.step)})` : `checkpoint ${fmtInt(s.step)}`;
}
