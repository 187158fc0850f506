// DOM and formatting helpers. Every string from the studio goes in as text
// (textContent / Text nodes), never as HTML.

export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value == null || value === false) continue;
    if (key === "class") el.className = value;
    else if (key === "text") el.textContent = value;
    else if (key.startsWith("on") && typeof value === "function") el.addEventListener(key.slice(2), value);
    else if (key === "dataset") Object.assign(el.dataset, value);
    // Through the CSSOM: the page's Content-Security-Policy refuses inline style attributes.
    else if (key === "style") el.style.cssText = String(value);
    else el.setAttribute(key, value === true ? "" : String(value));
  }
  appendAll(el, children);
  return el;
}

export function appendAll(el, children) {
  for (const child of children.flat(Infinity)) {
    if (child == null || child === false) continue;
    el.append(child instanceof Node ? child : String(child));
  }
  return el;
}

/** Replace the text of `el` only when it changed (keeps selection and screen readers calm). */
export function setText(el, text) {
  const value = text == null ? "" : String(text);
  if (el.textContent !== value) el.textContent = value;
}

export const isNum = (x) => typeof x === "number" && Number.isFinite(x);

export function fmtInt(n) {
  return isNum(n) ? Math.round(n).toLocaleString("en-US") : "–";
}

export function fmtOf(x, total, fmt = fmtInt) {
  if (!isNum(x) && !isNum(total)) return "–";
  return `${isNum(x) ? fmt(x) : "0"}/${isNum(total) ? fmt(total) : "?"}`;
}

export function fmtEpoch(e) {
  if (!isNum(e)) return "–";
  return Number.isInteger(e) ? String(e) : e.toFixed(2);
}

export function fmtLoss(x) {
  if (!isNum(x)) return "–";
  return Math.abs(x) >= 100 ? x.toFixed(1) : x.toPrecision(4);
}

export function fmtLr(x) {
  if (!isNum(x)) return "–";
  return x === 0 ? "0" : x.toExponential(2);
}

export function fmtDuration(s) {
  if (!isNum(s) || s < 0) return "–";
  s = Math.round(s);
  const hrs = Math.floor(s / 3600);
  const min = Math.floor((s % 3600) / 60);
  const sec = s % 60;
  if (hrs) return `${hrs}h ${String(min).padStart(2, "0")}m`;
  if (min) return `${min}m ${String(sec).padStart(2, "0")}s`;
  return `${sec}s`;
}

export function fmtBytes(n) {
  if (!isNum(n)) return "–";
  const units = ["B", "KB", "MB", "GB", "TB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) {
    n /= 1024;
    i++;
  }
  return `${i ? n.toFixed(1) : n} ${units[i]}`;
}

export function fmtTime(ts) {
  if (!isNum(ts)) return "–";
  const d = new Date(ts * 1000);
  const today = new Date();
  const sameDay = d.toDateString() === today.toDateString();
  return sameDay
    ? d.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" })
    : d.toLocaleString([], { month: "short", day: "numeric", hour: "2-digit", minute: "2-digit" });
}

export function isoTime(ts) {
  return isNum(ts) ? new Date(ts * 1000).toISOString() : "";
}

/** A progress bar that screen readers announce: role=progressbar with a value. */
export function progressBar(label) {
  const fill = h("span", { class: "bar-fill" });
  const bar = h("span", { class: "bar", role: "progressbar", "aria-label": label, "aria-valuemin": 0, "aria-valuemax": 100 }, fill);
  bar.update = (percent, indeterminate = false) => {
    if (isNum(percent)) {
      const p = Math.max(0, Math.min(100, percent));
      fill.style.width = `${p}%`;
      bar.setAttribute("aria-valuenow", String(p));
      bar.classList.remove("indeterminate");
    } else {
      fill.style.width = "0%";
      bar.removeAttribute("aria-valuenow");
      bar.classList.toggle("indeterminate", indeterminate);
    }
  };
  return bar;
}
