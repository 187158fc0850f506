// The live connection to one task: server-sent events with ids.
//
// The browser's EventSource reconnects by itself and sends Last-Event-ID, so
// after a studio restart the stream resumes right after the last event seen:
// nothing lost, nothing twice (events are also de-duplicated by seq here).
// If the browser gives up (readyState CLOSED, e.g. the studio answered 503
// while starting), we open a new one ourselves with ?after=<last seq>.
// A `studio` event starts every connection; a different started_at or pid
// than last time means the studio process restarted underneath us.

import { FINAL } from "./status.js";
import { taskUrl } from "./api.js";

const EVENT_KINDS = ["status", "train_begin", "progress", "eval", "checkpoint", "samples", "train_end", "suspended", "error"];

export class TaskStream {
  /**
   * @param {string} taskId
   * @param {number} afterSeq  last event seq already shown (from the stored history)
   * @param {{onStudio, onTask, onEvent, onState}} handlers
   */
  constructor(taskId, afterSeq, handlers) {
    this.taskId = taskId;
    this.lastSeq = afterSeq || 0;
    this.handlers = handlers;
    this.es = null;
    this.studio = null;
    this.connections = 0;
    this.stopped = false;
    this.retryTimer = null;
    this.retryDelay = 1000;
  }

  start() {
    this.stopped = false;
    this.open();
  }

  stop() {
    this.stopped = true;
    clearTimeout(this.retryTimer);
    if (this.es) this.es.close();
    this.es = null;
    this.handlers.onState?.("closed");
  }

  open() {
    if (this.stopped) return;
    const es = new EventSource(taskUrl(this.taskId, `/stream?after=${this.lastSeq}`));
    this.es = es;
    this.handlers.onState?.("connecting");
    es.onopen = () => {
      this.retryDelay = 1000;
      this.handlers.onState?.("live");
    };
    es.addEventListener("studio", (e) => {
      const info = parse(e.data);
      if (!info) return;
      this.connections += 1;
      const prev = this.studio;
      this.studio = info;
      const restarted = !!prev && (prev.started_at !== info.started_at || prev.pid !== info.pid);
      this.handlers.onStudio?.(info, restarted);
    });
    es.addEventListener("task", (e) => {
      const task = parse(e.data);
      if (!task) return;
      this.handlers.onTask?.(task);
      // The studio closes the stream after a final task; without this the browser would reconnect forever.
      if (FINAL.has(task.status)) this.stop();
    });
    for (const kind of EVENT_KINDS) {
      es.addEventListener(kind, (e) => {
        if (kind === "error" && !(e instanceof MessageEvent)) return this.onConnectionError(es);
        const ev = parse(e.data);
        if (!ev) return;
        const seq = Number.isFinite(ev.seq) ? ev.seq : Number(e.lastEventId);
        if (Number.isFinite(seq)) {
          if (seq <= this.lastSeq) return;
          this.lastSeq = seq;
        }
        this.handlers.onEvent?.(ev);
      });
    }
  }

  onConnectionError(es) {
    if (this.stopped || es !== this.es) return;
    this.handlers.onState?.("reconnecting");
    if (es.readyState === EventSource.CLOSED) {
      // The browser will not retry this one; we do, resuming after the last seq we have.
      clearTimeout(this.retryTimer);
      this.retryTimer = setTimeout(() => this.open(), this.retryDelay);
      this.retryDelay = Math.min(this.retryDelay * 2, 8000);
    }
  }
}

function parse(text) {
  try {
    return JSON.parse(text);
  } catch {
    return null;
  }
}
