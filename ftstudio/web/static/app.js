// ftstudio's page: a hash router over four views (list, new, task, compare) and the system panel.

import { mountList } from "./list.js";
import { mountNew } from "./new.js";
import { mountTask } from "./task.js";
import { mountCompare } from "./compare.js";
import { mountSystem } from "./system.js";
import { loginFromAddress } from "./api.js";
import { h } from "./dom.js";

const main = document.getElementById("main");
let view = null;

function route() {
  const hash = location.hash || "#/tasks";
  const [path, query] = hash.slice(1).split("?");
  const params = new URLSearchParams(query || "");
  view?.destroy?.();
  main.replaceChildren();
  window.scrollTo(0, 0);
  let m;
  let nav = "tasks";
  if ((m = path.match(/^\/tasks\/([^/]+)$/))) {
    view = mountTask(main, decodeURIComponent(m[1]));
  } else if (path === "/compare") {
    view = mountCompare(main, params);
  } else if (path === "/new") {
    nav = "new";
    view = mountNew(main, params);
  } else {
    view = mountList(main, params);
    document.title = "Fine-tunes · ftstudio";
  }
  if (nav === "new") document.title = "New fine-tune · ftstudio";
  for (const a of document.querySelectorAll("[data-nav]")) {
    if (a.dataset.nav === nav) a.setAttribute("aria-current", "page");
    else a.removeAttribute("aria-current");
  }
  // Move focus to the new view's heading so keyboard and screen-reader users land on it.
  if (routed) main.querySelector("h1")?.focus({ preventScroll: true });
  routed = true;
}
let routed = false;

// A login URL's code is traded for the page's key before any view asks the studio anything.
loginFromAddress()
  .catch((err) => main.before(h("p", { id: "login-problem", class: "error-text", role: "alert" }, err.message || String(err))))
  .finally(() => {
    window.addEventListener("hashchange", route);
    mountSystem(document.getElementById("system"));
    route();
  });
