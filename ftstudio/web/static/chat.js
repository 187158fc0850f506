// "Try it": chat with a task's adapter (or its newest checkpoint) in the page, the reply streamed
// token by token from POST /api/tasks/{id}/chat (server-sent events over fetch: EventSource cannot
// POST). "Compare with the base model" shows the base model's answer to the same messages beside it.
// Every text from the model goes into the page as text, never as HTML.

import { api, ApiError, authFetch, taskUrl } from "./api.js";
import { h } from "./dom.js";
import { sseEvents } from "./sse.js";

function number(label, id, value, attrs) {
  return h("label", { class: "chat-setting" }, label, h("input", { id, type: "number", value, ...attrs }));
}

export class ChatPanel {
  constructor(taskId) {
    this.taskId = taskId;
    this.history = []; // [{role, content}] of the fine-tune's own side of the conversation
    this.beside = false; // answer even while training holds every GPU and slot (the person said so)
    this.controller = null;
    this.log = h("div", { id: "chat-log", class: "chat-log", role: "log", "aria-live": "polite", "aria-label": "Conversation" });
    this.status = h("p", { id: "chat-status", class: "muted chat-status", "aria-live": "polite" });
    this.input = h("textarea", { id: "chat-input", rows: "2", placeholder: "Write a message… (Enter sends, Shift+Enter for a new line)", "aria-label": "Message" });
    this.compare = h("input", { id: "chat-compare", type: "checkbox" });
    this.system = h("textarea", { id: "chat-system", rows: "2", placeholder: "A system prompt (optional)" });
    this.send = h("button", { type: "submit", id: "chat-send", class: "primary" }, "Send");
    this.stop = h("button", { type: "button", id: "chat-stop", hidden: true }, "Stop");
    const reset = h("button", { type: "button", id: "chat-reset" }, "New conversation");
    this.weights = h("select", { id: "chat-weights", "aria-label": "Answer with" });
    this.settings = {
      temperature: number("Temperature", "chat-temperature", "0.7", { min: "0", max: "2", step: "0.1" }),
      top_p: number("Top-p", "chat-top-p", "0.9", { min: "0.05", max: "1", step: "0.05" }),
      max_new_tokens: number("Max new tokens", "chat-max-tokens", "256", { min: "1", max: "4096", step: "1" }),
    };
    const form = h(
      "form",
      { class: "chat-form" },
      this.input,
      h(
        "div",
        { class: "chat-controls" },
        this.send,
        this.stop,
        reset,
        h("label", {}, this.compare, " Compare with the base model"),
        h("label", {}, "Answer with ", this.weights),
      ),
      h("details", { class: "chat-settings" }, h("summary", {}, "Settings"), this.system, h("div", { class: "chat-numbers" }, Object.values(this.settings))),
    );
    form.addEventListener("submit", (e) => {
      e.preventDefault();
      this.ask();
    });
    this.input.addEventListener("keydown", (e) => {
      if (e.key === "Enter" && !e.shiftKey) {
        e.preventDefault();
        this.ask();
      }
    });
    this.stop.addEventListener("click", () => this.controller?.abort());
    reset.addEventListener("click", () => {
      this.controller?.abort();
      this.history = [];
      this.beside = false;
      this.log.replaceChildren();
      this.status.textContent = "";
    });
    this.el = h("div", { id: "chat" }, this.log, this.status, form);
  }

  /** Fill "Answer with": the adapter (a completed task) and every complete checkpoint, newest first. */
  async refresh() {
    // Whether anything can answer: the adapter or a saved checkpoint (false when the studio cannot say).
    try {
      const r = await api(taskUrl(this.taskId, "/checkpoints"));
      const keep = this.weights.value;
      const options = [
        ...(r.adapter ? [h("option", { value: "" }, "the adapter (final)")] : []),
        ...r.checkpoints.map((c) => h("option", { value: c.name }, `checkpoint ${c.step}`)),
      ];
      this.weights.replaceChildren(...(options.length ? options : [h("option", { value: "" }, "nothing saved yet")]));
      if ([...this.weights.options].some((o) => o.value === keep)) this.weights.value = keep;
      return options.length > 0;
    } catch {
      return false;
    }
  }

  value(name) {
    const input = this.settings[name].querySelector("input");
    return Number(input.value);
  }

  async ask() {
    const text = this.input.value;
    if (!text.trim() || this.controller) return;
    this.input.value = "";
    await this.sendText(text);
  }

  async sendText(text) {
    // An offer to answer beside training is for the message it was made for: it goes once another is sent.
    for (const offer of this.log.querySelectorAll(".chat-beside")) offer.remove();
    const compare = this.compare.checked;
    const messages = [...this.history, { role: "user", content: text }];
    const said = h("div", { class: "chat-msg chat-user" }, h("span", { class: "chat-who" }, "You"), h("p", {}, text));
    this.log.append(said);
    const columns = {};
    const reply = h("div", { class: compare ? "chat-reply chat-compare" : "chat-reply" });
    for (const who of compare ? ["adapter", "base"] : ["adapter"]) {
      const body = h("p", { class: "chat-text", "data-who": who });
      columns[who] = body;
      reply.append(h("div", { class: `chat-msg chat-${who}` }, h("span", { class: "chat-who" }, who === "adapter" ? "Fine-tuned" : "Base model"), body));
    }
    this.log.append(reply);
    this.controller = new AbortController();
    this.send.disabled = true;
    this.stop.hidden = false;
    this.status.textContent = "Sending…";
    let finished = false;
    let number = 0; // which reply of the studio's chat this is (its first event says), for Stop
    try {
      const res = await authFetch(taskUrl(this.taskId, "/chat"), {
        method: "POST",
        headers: { "Content-Type": "application/json", Accept: "text/event-stream" },
        body: JSON.stringify({
          messages,
          system: this.system.value,
          temperature: this.value("temperature"),
          top_p: this.value("top_p"),
          max_new_tokens: this.value("max_new_tokens"),
          compare,
          checkpoint: this.weights.value,
          beside_training: this.beside,
        }),
        signal: this.controller.signal,
      });
      if (!res.ok) {
        let detail = `The studio answered ${res.status}`;
        let code = "";
        try {
          const data = await res.json();
          if (typeof data.detail === "string") detail = data.detail;
          if (typeof data.code === "string") code = data.code;
        } catch {
          // not JSON: keep the status line
        }
        throw Object.assign(new ApiError(res.status, detail), { code });
      }
      for await (const { event, data } of sseEvents(res)) {
        if (event === "worker") number = data.reply || 0;
        else if (event === "loading") this.status.textContent = "Loading the model (the first message takes longest)…";
        else if (event === "ready") this.status.textContent = `Answering with ${data.weights === "adapter" ? "the adapter" : data.weights.replace("-", " ")}…`;
        else if (event === "token") {
          // Follow the reply down, unless the person scrolled up to read.
          const follow = this.log.scrollHeight - this.log.scrollTop - this.log.clientHeight < 40;
          columns[data.who]?.append(document.createTextNode(data.text));
          if (follow) this.log.scrollTop = this.log.scrollHeight;
        }
        else if (event === "error") throw Object.assign(new ApiError(500, data.message), { code: data.code || "" });
        else if (event === "end") finished = true;
      }
      this.status.textContent = finished ? "" : "The reply ended early.";
      if (finished) this.history = [...messages, { role: "assistant", content: columns.adapter.textContent }];
    } catch (err) {
      if (err.name === "AbortError") {
        // Tell the studio before Send is back: the closed connection alone may reach it only after the
        // next message, which would then wait behind a reply nobody had stopped.
        this.status.textContent = "Stopping…";
        if (number) await api(taskUrl(this.taskId, `/chat/stop?reply=${number}`), { method: "POST" }).catch(() => {});
        this.status.textContent = "Stopped.";
      } else {
        this.status.textContent = "";
        // A refused or failed message shows its reason alone: a box that got no words (the "Fine-tuned"
        // made ready before the studio answered) would read as an empty answer.
        for (const body of Object.values(columns)) if (!body.textContent) body.parentElement.remove();
        reply.append(h("p", { class: "error-text" }, err.message || String(err)));
        if (err.code === "chat_waits_for_training") reply.append(this.besideButton(text, said, reply));
      }
    } finally {
      this.controller = null;
      this.send.disabled = false;
      this.stop.hidden = true;
      reply.dataset.done = "true";
    }
  }

  /** Training holds the machine: offer to answer anyway, with the CPU time training leaves idle, for the
   * rest of this conversation (a new conversation asks again). */
  besideButton(text, said, reply) {
    const button = h("button", { type: "button", class: "chat-beside" }, "Answer beside training (it slows training some)");
    button.addEventListener("click", () => {
      if (this.controller) return;
      this.beside = true;
      said.remove();
      reply.remove();
      this.sendText(text);
    });
    return button;
  }

  destroy() {
    this.controller?.abort();
  }
}
