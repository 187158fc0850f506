// One task: progress, where it stands in the queue or why it is paused, a live loss
// curve from the stored history, the answers to its held-out prompts, its attempts, a
// log tail, the config, the error, the artifacts, and the actions the API allows now.
// The event stream keeps it live through studio restarts (see stream.js) and is opened
// again when a retry, an extend or a resume brings an ended task back.

import { api, ApiError, downloadLink, taskUrl } from "./api.js";
import { h, setText, isNum, fmtInt, fmtOf, fmtEpoch, fmtLoss, fmtLr, fmtDuration, fmtTime, fmtBytes, progressBar } from "./dom.js";
import { STATUSES, RUNNING, FINAL, ACTIONS, statusBadge, setBadge, isPausing } from "./status.js";
import { LossChart } from "./chart.js";
import { MetricsChart } from "./metrics.js";
import { LogTail } from "./logtail.js";
import { TaskStream } from "./stream.js";
import { confirmDialog, extendDialog } from "./dialog.js";
import { queueSentence, fmtResource } from "./queue.js";
import { AttemptsTimeline } from "./attempts.js";
import { ChatPanel } from "./chat.js";
import { handoverPanel } from "./handover.js";
import { HeldOutPanel } from "./heldout.js";

export function mountTask(root, taskId) {
  let task = null;
  let destroyed = false;
  let stream = null;
  let fallbackTimer = null;
  let restartSeen = false;
  let artifactsFor = null;
  let historySeq = 0;

  const title = h("h1", { id: "task-title", tabindex: "-1" }, taskId);
  const badge = statusBadge("queued");
  const connection = h("span", { id: "connection", class: "connection muted", "aria-live": "polite" });
  const banner = h("div", { id: "restart-banner", class: "banner", role: "status", hidden: true });
  const failure = h("div", { id: "task-error", class: "failure", role: "alert", hidden: true });
  // The data's warnings recorded at submit (truncation, leaked held-out prompts): the run went ahead with them.
  const dataWarnings = h("ul", { id: "task-warnings", class: "inspect-warnings", hidden: true });
  // The time per epoch estimated at submit and, once the run ends, what it measured (the estimate's error).
  const timeEstimate = h("p", { id: "task-time-estimate", class: "time-estimate muted", hidden: true });
  // Where a queued task stands, or what a paused one holds: one line, kept current by the stream.
  const notice = h("div", { id: "task-notice", class: "notice", role: "status", hidden: true });
  const actionMsg = h("p", { class: "error-text", role: "alert", hidden: true });
  const actionNote = h("span", { class: "muted", "aria-live": "polite" });
  const actions = h("div", { class: "task-actions", id: "task-actions", role: "group", "aria-label": "Actions" });
  const bar = progressBar("Training progress");
  bar.id = "task-progress";
  const stat = {};
  const statItem = (key, label) => h("div", { class: "stat" }, h("dt", {}, label), (stat[key] = h("dd", { id: `stat-${key}` }, "–")));
  const stats = h(
    "dl",
    { class: "stats" },
    statItem("percent", "Progress"),
    statItem("step", "Step"),
    statItem("epoch", "Epoch"),
    statItem("eta", "ETA"),
    statItem("tps", "Tokens/s"),
    statItem("loss", "Loss"),
    statItem("eval", "Eval loss"),
    statItem("lr", "Learning rate"),
    statItem("elapsed", "Elapsed"),
    statItem("phase", "Phase"),
  );
  const meta = h("p", { class: "muted meta" });
  const chart = new LossChart();
  const metrics = new MetricsChart();
  const log = new LogTail(taskId);
  const timeline = new AttemptsTimeline(taskId);
  const configPre = h("pre", { class: "config", id: "task-config", tabindex: "0" });
  const heldout = new HeldOutPanel(taskId);
  const heldoutSection = h("section", { id: "held-out", "aria-labelledby": "heldout-title", hidden: true }, h("h2", { id: "heldout-title" }, "Held-out prompts"), heldout.el);
  const chat = new ChatPanel(taskId);
  let chatFor = null; // the status the chat's "Answer with" list was filled for
  const chatSection = h("section", { id: "try-it", "aria-labelledby": "chat-title", hidden: true }, h("h2", { id: "chat-title" }, "Try it"), chat.el);
  const artifacts = h("div", { id: "artifacts" }, h("p", { class: "muted" }, "The adapter appears here when training completes."));

  root.append(
    h(
      "article",
      { class: "task-view", "aria-labelledby": "task-title" },
      h("p", { class: "crumbs" }, h("a", { href: "#/tasks" }, "← All fine-tunes")),
      h("div", { class: "title-row" }, title, badge, connection),
      meta,
      banner,
      notice,
      failure,
      dataWarnings,
      timeEstimate,
      h("div", { class: "progress-row" }, bar),
      stats,
      h("div", { class: "actions-row" }, actions, actionNote),
      actionMsg,
      h("section", { "aria-labelledby": "curve-title" }, h("h2", { id: "curve-title" }, "Loss curve"), chart.el, metrics.el),
      heldoutSection,
      h("section", { "aria-labelledby": "attempts-title" }, h("h2", { id: "attempts-title" }, "Attempts"), timeline.el),
      h("section", { "aria-labelledby": "log-title" }, h("h2", { id: "log-title" }, "Log"), log.el),
      chatSection,
      h("section", { "aria-labelledby": "art-title" }, h("h2", { id: "art-title" }, "Artifacts"), artifacts),
      h("section", { "aria-labelledby": "cfg-title" }, h("details", {}, h("summary", {}, h("h2", { id: "cfg-title" }, "Configuration")), configPre)),
    ),
  );

  async function init() {
    try {
      const t = await api(taskUrl(taskId));
      if (destroyed) return;
      apply(t);
    } catch (err) {
      if (destroyed) return;
      return gone(err);
    }
    // The stored history first (complete after a reload or a restart), then live events after it.
    let after = 0;
    try {
      for (let i = 0; i < 1000; i++) {
        const r = await api(taskUrl(taskId, `/metrics?after=${after}`));
        const events = (r && r.events) || [];
        for (const ev of events) {
          chart.add(ev);
          metrics.add(ev);
          if (isNum(ev.seq)) after = historySeq = Math.max(after, ev.seq);
        }
        if (!events.length || destroyed) break;
      }
    } catch {
      // the stream replays whatever the history call missed
    }
    if (destroyed) return;
    if (!FINAL.has(task.status)) loadSamples(); // an ended task's were asked for when it was shown
    log.start();
    if (FINAL.has(task.status)) {
      log.finish();
      return;
    }
    openStream(after);
  }

  const handlers = {
    onStudio: (_info, restarted) => {
      if (restarted) restartSeen = true;
    },
    onTask: (t) => apply(t),
    onEvent: (ev) => {
      chart.add(ev);
      metrics.add(ev);
      if (ev.kind === "samples") loadSamples();
    },
    onState: (state) => connectionState(state),
  };

  function openStream(after) {
    stream = new TaskStream(taskId, after, handlers);
    stream.start();
  }

  function gone(err) {
    stream?.stop();
    log.stop();
    const msg = err instanceof ApiError && err.status === 404 ? "This fine-tune does not exist (it may have been deleted)." : err.message;
    root.replaceChildren(
      h("article", {}, h("p", { class: "crumbs" }, h("a", { href: "#/tasks" }, "← All fine-tunes")), h("h1", { tabindex: "-1" }, "Fine-tune not found"), h("p", { role: "alert" }, msg)),
    );
  }

  let wasLive = false;
  function connectionState(state) {
    clearTimeout(fallbackTimer);
    connection.dataset.state = state;
    if (state === "live") {
      wasLive = true;
      setText(connection, "● live");
    } else if (state === "closed") {
      setText(connection, "");
    } else if (state === "connecting" && !wasLive) {
      setText(connection, "Connecting…");
    } else {
      setText(connection, "Reconnecting to the studio…");
      // While the stream is down, ask for the task directly so a stale "training" never lingers.
      fallbackTimer = setTimeout(poll, 3000);
    }
  }

  async function poll() {
    if (destroyed || !stream || stream.stopped) return;
    try {
      apply(await api(taskUrl(taskId)));
      if (FINAL.has(task.status)) stream.stop();
    } catch (err) {
      if (err instanceof ApiError && err.status === 404) return gone(err);
    }
    if (connection.dataset.state !== "live" && !stream.stopped) fallbackTimer = setTimeout(poll, 3000);
  }

  function apply(t) {
    if (destroyed || !t) return;
    // A reply that left the studio before the one already shown (a slow poll racing the stream) is stale.
    if (task && isNum(t.updated_at) && isNum(task.updated_at) && t.updated_at < task.updated_at) return;
    task = t;
    const running = RUNNING.has(t.status);
    setText(title, t.name || t.id);
    document.title = `${t.name || t.id} · ${STATUSES[t.status]?.label || t.status} · ftstudio`;
    setBadge(badge, t.status);
    // A task on a cluster says which job holds it, and what the scheduler says of that job now.
    const job = t.slurm ? ` · Slurm job ${t.slurm.job_id}${t.slurm.state ? ` (${t.slurm.state.toLowerCase()})` : ""}` : "";
    setText(meta, `${t.model} on ${t.dataset} · created ${fmtTime(t.created_at)}${t.attempt > 1 ? ` · attempt ${t.attempt}` : ""}${job} · ${t.id}`);
    bar.update(t.percent, running);
    setText(stat.percent, isNum(t.percent) ? `${t.percent.toFixed(t.percent % 1 ? 1 : 0)}%` : "–");
    setText(stat.step, fmtOf(t.step, t.total_steps));
    setText(stat.epoch, isNum(t.epoch) || isNum(t.total_epochs) ? fmtOf(t.epoch, t.total_epochs, fmtEpoch) : "–");
    setText(stat.eta, running ? fmtDuration(t.eta_s) : "–");
    setText(stat.tps, isNum(t.tokens_per_s) ? fmtInt(t.tokens_per_s) : "–");
    setText(stat.loss, fmtLoss(t.loss));
    setText(stat.eval, fmtLoss(t.eval_loss));
    setText(stat.lr, fmtLr(t.lr));
    setText(stat.elapsed, fmtDuration(t.elapsed_s));
    setText(
      stat.phase,
      running
        ? t.phase || STATUSES[t.status]?.hint || "–"
        : t.status === "completed"
          ? "done"
          : t.status === "paused" && t.phase
            ? t.phase
            : STATUSES[t.status]?.label.toLowerCase() || "–",
    );
    stat.phase.title = stat.phase.textContent;
    chart.setTotal(t.total_steps);
    chart.setAttempts(t.attempts);

    // The truth about restarts: only while the training is still running.
    if (running && (restartSeen || t.reattached)) {
      const at = isNum(t.reattached_at) ? ` at ${fmtTime(t.reattached_at)}` : "";
      setText(banner, `The studio restarted${at}; your training kept running and is at step ${fmtOf(t.step, t.total_steps)}.`);
      banner.hidden = false;
    } else if (restartSeen && !FINAL.has(t.status) && t.status !== "queued") {
      setText(banner, `The studio restarted; this fine-tune is now ${STATUSES[t.status]?.label.toLowerCase() || t.status} (${STATUSES[t.status]?.hint || ""}).`);
      banner.hidden = false;
    } else {
      banner.hidden = true;
    }

    if (t.status === "failed" || (t.status === "interrupted" && t.error)) {
      const lead = t.status === "failed" ? "Training failed: " : "Training was interrupted: ";
      failure.replaceChildren(h("strong", {}, lead), t.error || "the training process ended without saying why.");
      failure.hidden = false;
    } else {
      failure.hidden = true;
    }

    const warned = Array.isArray(t.warnings) ? t.warnings : [];
    if (warned.length && !dataWarnings.childElementCount) {
      dataWarnings.replaceChildren(...warned.map((w) => h("li", { class: "warn", dataset: { kind: w.kind } }, `Data: ${w.message}`)));
    }
    dataWarnings.hidden = !warned.length;

    const timed = t.time_estimate;
    if (timed && timed.line) {
      const said = `Estimated ${timed.line}${timed.line_measured ? `; ${timed.line_measured}` : ""}.`;
      if (timeEstimate.textContent !== said) timeEstimate.textContent = said;
    }
    timeEstimate.hidden = !(timed && timed.line);

    showNotice(t);
    // "Try it" whenever something can answer (the adapter of a completed task, a checkpoint another
    // saved), but not while it trains: the chat would take its CPU.
    const chatty = !RUNNING.has(t.status);
    if (chatty && chatFor !== t.status) {
      chat.refresh().then((any) => (chatSection.hidden = destroyed || !any || RUNNING.has(task.status)));
    }
    if (!chatty) chatSection.hidden = true;
    chatFor = chatty ? t.status : null;
    timeline.update(t);
    renderActions(t.actions || []);
    if (!configPre.textContent) configPre.textContent = JSON.stringify(typeof t.config === "string" ? safeJson(t.config) : t.config, null, 2);
    if (!FINAL.has(t.status) && artifactsFor) revive();
    if (FINAL.has(t.status)) {
      chart.setEnded(t.status);
      log.finish();
      setText(connection, "");
      clearTimeout(fallbackTimer);
      if (artifactsFor !== t.status) {
        artifactsFor = t.status;
        loadArtifacts();
        loadSamples(); // a samples event the stream missed
      }
    }
  }

  /** A retry or an extend brought an ended task back: follow it live again. */
  function revive() {
    artifactsFor = null;
    chart.setEnded(null);
    if (!stream || stream.stopped) {
      openStream(stream ? stream.lastSeq : historySeq);
      log.restart();
    }
  }

  function showNotice(t) {
    let kind = "";
    let body = [];
    const holds = (t.resources || []).map(fmtResource).join(", ");
    if (t.status === "queued" && t.queue) {
      kind = "queued";
      body = queueSentence(t.queue);
    } else if (t.status === "paused" && (t.frozen || t.phase === "frozen")) {
      kind = "frozen";
      body = [
        h("strong", {}, "Frozen: "),
        "the process is stopped where it was; its memory and GPU stay held until you resume or cancel.",
        holds ? ` It holds ${holds}.` : "",
      ];
    } else if (t.status === "paused" && t.phase === "held") {
      kind = "held";
      body = [h("strong", {}, "Held: "), "paused while still in the queue; it does not start until you resume it."];
    } else if (t.status === "paused") {
      kind = "paused";
      body = [h("strong", {}, "Paused: "), `its checkpoint${isNum(t.step) ? ` at step ${fmtInt(t.step)}` : ""} is saved and no process runs; its slot or GPUs are free. Resume puts it back in the queue.`];
    } else if (isPausing(t)) {
      kind = "pausing";
      body = [h("strong", {}, "Pausing: "), "saving a checkpoint at the next step; the training stops once it is written."];
    } else if (t.status === "interrupted" && t.resumes && isNum(t.resumes.at)) {
      // A machine that keeps stopping attempts before they progress is waited out, never counted as a failure.
      kind = "waiting";
      body = [
        h("strong", {}, "Waiting out the machine: "),
        `it stopped ${fmtInt(t.resumes.stalled)} attempts in a row before they made progress (reboots, shutdowns, killed runners). `,
        `The next attempt starts by itself at ${fmtTime(t.resumes.at)}, from the newest checkpoint; this is not counted against the restart budget.`,
      ];
    }
    const key = JSON.stringify([kind, t.queue, holds, t.step, t.resumes]);
    if (notice.dataset.key === key) return;
    notice.dataset.key = key;
    notice.dataset.kind = kind;
    notice.replaceChildren(...body);
    notice.hidden = !kind;
  }

  function renderActions(allowed) {
    const want = Object.keys(ACTIONS).filter((a) => allowed.includes(a));
    const have = [...actions.children].map((b) => b.dataset.action);
    if (want.join() === have.join()) return;
    actions.replaceChildren(
      ...want.map((a) =>
        h("button", { type: "button", class: ACTIONS[a].destructive ? "danger" : "", dataset: { action: a }, title: ACTIONS[a].hint, onclick: () => act(a) }, ACTIONS[a].label),
      ),
    );
  }

  async function act(action) {
    actionMsg.hidden = true;
    const label = task.name || task.id;
    if (action === "extend") {
      const t = await extendDialog(task, (json) => api(taskUrl(taskId, "/extend"), { method: "POST", json }));
      if (t) apply(t);
      return;
    }
    if (action === "delete") {
      const ok = await confirmDialog(`Delete “${label}”?`, "The task, its log, its checkpoints and its adapter are removed from the studio. This cannot be undone.", "Delete");
      if (!ok) return;
    }
    const buttons = [...actions.querySelectorAll("button")];
    buttons.forEach((b) => (b.disabled = true));
    const pending = ACTIONS[action].pending;
    if (pending) setText(actionNote, pending);
    try {
      if (action === "delete") {
        await api(taskUrl(taskId), { method: "DELETE" });
        stream?.stop();
        location.hash = "#/tasks";
        return;
      }
      apply(await api(taskUrl(taskId, `/${action}`), { method: "POST" }));
    } catch (err) {
      actionMsg.textContent = `${ACTIONS[action].label} failed: ${err.message}`;
      actionMsg.hidden = false;
    } finally {
      setText(actionNote, "");
      buttons.forEach((b) => (b.disabled = false));
    }
  }

  /** The held-out prompts' answers; the section shows once there are any. */
  async function loadSamples() {
    try {
      const n = await heldout.load();
      if (!destroyed) heldoutSection.hidden = !n;
    } catch {
      // kept as it was: the next samples event or the task's end asks again
    }
  }

  async function loadArtifacts() {
    if (task.status !== "completed") {
      artifacts.replaceChildren(h("p", { class: "muted" }, "No adapter: this fine-tune did not complete."));
      return;
    }
    try {
      const r = await api(taskUrl(taskId, "/artifacts"));
      if (destroyed) return;
      const files = (r && r.files) || [];
      const total = files.reduce((a, f) => a + (f.size || 0), 0);
      const fileLink = (name) => downloadLink(taskUrl(taskId, `/files/${encodeURIComponent(name)}`), name, name);
      artifacts.replaceChildren(
        h(
          "p",
          {},
          downloadLink(taskUrl(taskId, "/adapter.tar.gz"), `${taskId}-adapter.tar.gz`, "Download adapter (.tar.gz)", { class: "button", id: "download-adapter" }),
          ` ${files.length} files, ${fmtBytes(total)}`,
        ),
        // A completed run is where the next one may begin: SFT, then DPO or GRPO on the same adapter.
        h("p", {}, h("a", { class: "button secondary", id: "start-from-here", href: `#/new?from=${encodeURIComponent(taskId)}` }, "Start from this adapter"), h("span", { class: "muted" }, " a new fine-tune (DPO, GRPO, more SFT) that goes on from this one")),
        h(
          "ul",
          { class: "files" },
          files.map((f) =>
            h("li", {}, ["training_config.json", "summary.json"].includes(f.name) ? fileLink(f.name) : h("code", {}, f.name), h("span", { class: "muted" }, ` ${fmtBytes(f.size)}`)),
          ),
        ),
      );
      const use = await handoverPanel(taskId);
      if (destroyed) return;
      artifacts.append(h("h3", { id: "use-title" }, "Use it"), use);
    } catch (err) {
      artifacts.replaceChildren(h("p", { class: "error-text" }, `Could not list the artifacts: ${err.message}`));
    }
  }

  init();
  return {
    destroy() {
      destroyed = true;
      clearTimeout(fallbackTimer);
      stream?.stop();
      log.stop();
      chat.destroy();
      chart.destroy();
      metrics.destroy();
      heldout.destroy();
    },
  };
}

function safeJson(text) {
  try {
    return JSON.parse(text);
  } catch {
    return text;
  }
}
