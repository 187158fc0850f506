// The small system panel: studio version, data home, CPUs, memory, GPUs.

import { api } from "./api.js";
import { h, isNum, fmtBytes, progressBar, setText } from "./dom.js";

const REFRESH_MS = 10000;

export function mountSystem(root) {
  const body = h("div", { id: "system-body" }, h("p", { class: "muted" }, "Loading…"));
  const health = h("span", { id: "studio-health", class: "muted" });
  root.append(h("h2", { id: "system-title" }, "System ", health), body);
  let timer = null;

  async function load() {
    clearTimeout(timer);
    if (!document.hidden) {
      try {
        render(await api("/api/system"));
        setText(health, "");
      } catch (err) {
        setText(health, err.status === 0 ? "· studio unreachable" : err.status === 401 ? "· not logged in" : `· ${err.message}`);
      }
    }
    timer = setTimeout(load, REFRESH_MS);
  }

  function meter(label, used, total, text) {
    const bar = progressBar(label);
    bar.update(total ? (100 * used) / total : null);
    return h("div", { class: "meter" }, h("div", { class: "meter-label" }, h("span", {}, label), h("span", { class: "muted" }, text)), bar);
  }

  function render(sys) {
    const rows = [];
    rows.push(h("dl", { class: "kv" }, h("dt", {}, "Studio"), h("dd", { id: "studio-version" }, sys.version ? `ftstudio ${sys.version}` : "–"), h("dt", {}, "Data home"), h("dd", { id: "studio-home" }, h("code", {}, sys.home || "–"))));
    // Either cpus: [{index, percent}] or cpu_count with cpu_percent (a number, or one per CPU).
    let cpus = Array.isArray(sys.cpus) ? sys.cpus : null;
    if (!cpus && Array.isArray(sys.cpu_percent)) cpus = sys.cpu_percent.map((percent, index) => ({ index, percent }));
    const cpuCount = cpus ? cpus.length : sys.cpu_count;
    const cpuPct = cpus && cpus.length ? cpus.reduce((a, c) => a + (c.percent || 0), 0) / cpus.length : sys.cpu_percent;
    if (isNum(cpuCount) || isNum(cpuPct)) {
      rows.push(meter(`CPU${isNum(cpuCount) ? ` × ${cpuCount}` : ""}`, cpuPct || 0, 100, isNum(cpuPct) ? `${Math.round(cpuPct)}% busy` : ""));
      if (cpus && cpus.length > 1 && cpus.length <= 128) {
        rows.push(
          h(
            "div",
            { class: "cores", role: "img", "aria-label": `Per-core use: ${cpus.map((c) => `${Math.round(c.percent || 0)}%`).join(", ")}` },
            cpus.map((c) => h("span", { class: "core", title: `CPU ${c.index}: ${Math.round(c.percent || 0)}%`, style: `--p:${Math.round(c.percent || 0)}%` })),
          ),
        );
      }
    }
    const mem = sys.memory;
    if (mem && isNum(mem.total)) rows.push(meter("Memory", mem.used || 0, mem.total, `${fmtBytes(mem.used)} / ${fmtBytes(mem.total)}`));
    const gpus = Array.isArray(sys.gpus) ? sys.gpus : [];
    if (gpus.length) {
      for (const g of gpus) {
        rows.push(meter(`GPU ${g.index ?? ""} ${g.name || ""}`.trim(), g.memory_used || 0, g.memory_total, `${fmtBytes(g.memory_used)} / ${fmtBytes(g.memory_total)}`));
      }
    } else {
      rows.push(h("p", { class: "muted", id: "no-gpu" }, "No GPU found: training runs on the CPU."));
    }
    const executor = executorLines(sys.executor);
    if (executor.length) rows.push(h("div", { id: "studio-executor" }, executor.map(([text, cls]) => h("p", { class: cls }, text))));
    body.replaceChildren(...rows);
  }

  load();
  return { destroy: () => clearTimeout(timer) };
}

/** Where new fine-tunes go, and the check of changed Slurm settings (pending, or how the last one went). */
function executorLines(state) {
  if (!state) return [];
  const where = state.kind === "slurm" ? `Slurm partition ${state.partition}` : "this machine";
  const out = [[`New fine-tunes run on ${where}.`, "muted"]];
  const hhmm = (t) => new Date((t || 0) * 1000).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
  if (state.pending) {
    const meanwhile = state.held ? "new fine-tunes wait in the queue until it passes" : `they go to ${where} until it passes`;
    out.push([`Checking Slurm partition ${state.pending.partition}: its check job has waited since ${hhmm(state.pending.since)}; ${meanwhile}.`, "notice"]);
  } else if (state.last_check && Date.now() / 1000 - state.last_check.at < 24 * 3600) {
    const c = state.last_check;
    out.push([c.passed ? `Slurm check passed at ${hhmm(c.at)}.` : `Slurm check failed at ${hhmm(c.at)}, nothing changed: ${c.line}`, c.passed ? "muted" : "error-text"]);
  }
  return out;
}
