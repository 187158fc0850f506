// Follows training.log by byte offset, like `tail -f`: pausing stops the
// polling and the scrolling; resuming picks up exactly where it stopped.

import { api, downloadLink, taskUrl } from "./api.js";
import { h } from "./dom.js";

const KEEP_CHARS = 200_000; // what the page keeps on screen
const START_BYTES = 64 * 1024; // how far back from the end a fresh view starts

export class LogTail {
  constructor(taskId) {
    this.taskId = taskId;
    this.offset = null;
    this.paused = false;
    this.done = false; // the task has ended: read to the end once more, then stop
    this.timer = null;
    this.stopped = false;
    this.pre = h("pre", { class: "log", tabindex: "0", "aria-label": "Training log" });
    this.note = h("span", { class: "muted log-note", "aria-live": "polite" });
    this.button = h("button", { type: "button", class: "secondary", "aria-pressed": "false", onclick: () => this.toggle() }, "Pause log");
    const full = downloadLink(taskUrl(taskId, "/files/training.log"), "training.log", "Download the whole log");
    this.el = h("div", { class: "log-box" }, h("div", { class: "log-tools" }, this.button, full, this.note), this.pre);
  }

  start() {
    this.poll();
  }

  stop() {
    this.stopped = true;
    clearTimeout(this.timer);
  }

  restart() {
    this.done = false;
    if (!this.stopped) return;
    this.stopped = false;
    this.poll();
  }

  finish() {
    this.done = true;
  }

  toggle() {
    this.paused = !this.paused;
    this.button.textContent = this.paused ? "Resume log" : "Pause log";
    this.button.setAttribute("aria-pressed", String(this.paused));
    this.note.textContent = this.paused ? "Log paused; new lines are kept for when you resume." : "";
    if (!this.paused) {
      clearTimeout(this.timer);
      this.poll();
    }
  }

  async poll() {
    if (this.stopped || this.paused) return;
    // Only a read that began after the task ended may conclude the log is complete.
    const endedBefore = this.done;
    let caughtUp = false;
    try {
      if (this.offset === null) {
        // A negative offset asks for the last bytes of the log: a fresh view starts near the end.
        const r = await api(taskUrl(this.taskId, `/logs?offset=-${START_BYTES}`));
        if (r.offset > 0) this.append(`… (${Math.round(r.offset / 1024)} KB earlier in training.log)\n`);
        if (r.text) this.append(r.text);
        this.offset = r.next_offset;
      }
      for (let i = 0; i < 20 && !this.paused; i++) {
        const r = await api(taskUrl(this.taskId, `/logs?offset=${this.offset}`));
        if (r.text) this.append(r.text);
        const next = Number.isFinite(r.next_offset) ? r.next_offset : this.offset;
        const moved = next > this.offset;
        this.offset = next;
        caughtUp = !moved || next >= (r.size ?? next);
        if (caughtUp) break;
      }
    } catch (err) {
      if (err.status === 404) return this.stop();
      // the studio may be restarting: keep trying
    }
    if (this.stopped) return;
    if (endedBefore && caughtUp) return this.stop();
    this.timer = setTimeout(() => this.poll(), document.hidden ? 5000 : 1000);
  }

  append(text) {
    const pre = this.pre;
    const atBottom = pre.scrollHeight - pre.scrollTop - pre.clientHeight < 40;
    pre.append(text);
    if (pre.textContent.length > KEEP_CHARS * 1.5) {
      pre.textContent = pre.textContent.slice(-KEEP_CHARS);
    }
    if (atBottom && !this.paused) pre.scrollTop = pre.scrollHeight;
  }
}
