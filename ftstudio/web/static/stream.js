// The live connection to one task: server-sent events with ids, read over a signed fetch().
//
// After a studio restart (or any cut) the stream is opened again with ?after=<last seq seen>, so it
// resumes right after the last event shown: nothing lost, nothing twice (events are also de-duplicated
// by seq here). Each new connection first has the studio prove itself (api.js), so a program that took
// the port while the studio was down is sent nothing. A `studio` event starts every connection; a
// different started_at or pid than last time means the studio process restarted underneath us.

import { FINAL } from "./status.js";
import { authFetch, forgetSession, taskUrl } from "./api.js";
import { sseEvents } from "./sse.js";

const EVENT_KINDS = new Set(["status", "train_begin", "progress", "eval", "checkpoint", "samples", "train_end", "suspended", "error"]);

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
    this.controller = null;
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
    this.controller?.abort();
    this.controller = null;
    this.handlers.onState?.("closed");
  }

  async open() {
    if (this.stopped) return;
    const controller = new AbortController();
    this.controller = controller;
    this.handlers.onState?.("connecting");
    try {
      const res = await authFetch(taskUrl(this.taskId, `/stream?after=${this.lastSeq}`), {
        headers: { Accept: "text/event-stream" },
        signal: controller.signal,
      });
      if (res.ok) {
        this.retryDelay = 1000;
        this.handlers.onState?.("live");
        for await (const { event, id, data } of sseEvents(res)) {
          if (controller !== this.controller) return;
          this.dispatch(event, id, data);
        }
      }
    } catch {
      // cut off, refused, or the studio could not prove itself: try again below
    }
    if (this.stopped || controller !== this.controller) return;
    forgetSession(); // the studio may have stopped, and something else may hold its port by the next try
    // The studio went away or refused: resume after the last seq we have, backing off to 8 s.
    this.handlers.onState?.("reconnecting");
    clearTimeout(this.retryTimer);
    this.retryTimer = setTimeout(() => this.open(), this.retryDelay);
    this.retryDelay = Math.min(this.retryDelay * 2, 8000);
  }

  dispatch(event, id, data) {
    if (event === "studio") {
      this.connections += 1;
      const prev = this.studio;
      this.studio = data;
      const restarted = !!prev && (prev.started_at !== data.started_at || prev.pid !== data.pid);
      this.handlers.onStudio?.(data, restarted);
    } else if (event === "task") {
      this.handlers.onTask?.(data);
      // The studio closes the stream after a final task; without this we would reconnect forever.
      if (FINAL.has(data.status)) this.stop();
    } else if (EVENT_KINDS.has(event)) {
      const seq = Number.isFinite(data.seq) ? data.seq : Number(id);
      if (Number.isFinite(seq)) {
        if (seq <= this.lastSeq) return;
        this.lastSeq = seq;
      }
      this.handlers.onEvent?.(data);
    }
  }
}
