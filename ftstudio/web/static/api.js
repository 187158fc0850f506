// The studio's HTTP API: JSON in, JSON out, errors as ApiError with field problems.
//
// Every request is signed, never carries a secret (ftstudio/web/signing.py says why): the page holds
// a non-extractable HMAC key in this origin's IndexedDB, bought once with the login URL's code, and
// signs method, host, path, body digest, time, a nonce and the studio's current epoch. Before it signs
// anything after a (re)connect, it sends a fresh challenge and checks the answer with that key: a
// program that took the studio's port is sent nothing it could use.

import { h } from "./dom.js";

export class ApiError extends Error {
  constructor(status, detail, problems = []) {
    super(detail);
    this.status = status;
    this.detail = detail;
    this.problems = problems;
  }
}

const UNREACHABLE = "The studio is not reachable. Is it running? (ftstudio studio start)";
const NOT_LOGGED_IN = "This browser is not logged in to the studio: open the link that `ftstudio studio url` prints on the machine that runs it.";
const NOT_OURS =
  "Something other than your studio answers at this address: it could not prove it is the studio this browser logged in to, so the page sends it nothing. " +
  "If you restarted the studio with a new token or data home, open the link that `ftstudio studio url` prints.";
const INSECURE =
  "This page signs its requests with the browser's Web Crypto, which browsers allow only over HTTPS or on this machine's loopback address: " +
  "open it through an SSH tunnel (ssh -L PORT:127.0.0.1:PORT host), or start the studio with --certfile and --keyfile.";
const EMPTY_DIGEST = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

let pageKey; // undefined: not looked up yet; null: this browser has none
let session = null; // {epoch, offset}: the studio proved itself; offset = its clock minus ours, in ms
let helloing = null;

const b64 = (bytes) => btoa(String.fromCharCode(...new Uint8Array(bytes))).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
const unb64 = (text) => Uint8Array.from(atob(text.replace(/-/g, "+").replace(/_/g, "/")), (c) => c.charCodeAt(0));
const random = (n) => b64(crypto.getRandomValues(new Uint8Array(n)));

async function mac(key, ...fields) {
  return b64(await crypto.subtle.sign("HMAC", key, new TextEncoder().encode(fields.join("\n"))));
}

async function digest(text) {
  const bytes = new Uint8Array(await crypto.subtle.digest("SHA-256", new TextEncoder().encode(text)));
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

// -- the key, in this origin's IndexedDB (a CryptoKey is stored as itself, and stays non-extractable) ------

function keys(mode, act) {
  return new Promise((resolve, reject) => {
    const open = indexedDB.open("ftstudio", 1);
    open.onupgradeneeded = () => open.result.createObjectStore("keys");
    open.onerror = () => reject(open.error);
    open.onsuccess = () => {
      const tx = open.result.transaction("keys", mode);
      const req = act(tx.objectStore("keys"));
      tx.oncomplete = () => {
        open.result.close();
        resolve(req.result ?? null);
      };
      tx.onerror = () => reject(tx.error);
    };
  });
}

async function loadKey() {
  if (pageKey === undefined) pageKey = await keys("readonly", (store) => store.get("page")).catch(() => null);
  return pageKey;
}

/** The login URL's `?login=CODE`: trade it for the page key, then drop it (and an old `?token=`) from the address bar. */
export async function loginFromAddress() {
  const params = new URLSearchParams(location.search);
  const code = params.get("login");
  if (!params.has("login") && !params.has("token")) return;
  params.delete("login");
  params.delete("token");
  const rest = params.toString();
  history.replaceState(null, "", location.pathname + (rest ? `?${rest}` : "") + location.hash);
  if (!code) return;
  if (!crypto.subtle) throw new ApiError(0, INSECURE);
  let res;
  try {
    res = await fetch("/api/login", { method: "POST", headers: { "X-Ftstudio-Login": code, Accept: "application/json" }, cache: "no-store" });
  } catch {
    throw new ApiError(0, UNREACHABLE);
  }
  const data = await res.json().catch(() => null);
  if (!res.ok || !data || typeof data.key !== "string") throw new ApiError(res.status || 401, (data && data.detail) || NOT_LOGGED_IN);
  const key = await crypto.subtle.importKey("raw", unb64(data.key), { name: "HMAC", hash: "SHA-256" }, false, ["sign"]);
  await keys("readwrite", (store) => store.put(key, "page"));
  pageKey = key;
  session = { epoch: data.epoch, offset: Number(data.time) * 1000 - Date.now() };
}

/** The connection was cut (a stream ended early): whoever answers next proves itself before anything is signed. */
export function forgetSession() {
  session = null;
}

/** The studio's epoch, once it has proved that it holds our key (after every reconnect). */
async function ensureSession() {
  if (session) return session;
  if (!helloing) helloing = hello().finally(() => (helloing = null));
  return helloing;
}

async function hello() {
  if (!crypto.subtle) throw new ApiError(0, INSECURE);
  const key = await loadKey();
  if (!key) throw new ApiError(401, NOT_LOGGED_IN);
  const challenge = random(24);
  let res;
  try {
    res = await fetch(`/api/hello?challenge=${challenge}`, { headers: { Accept: "application/json" }, cache: "no-store" });
  } catch {
    throw new ApiError(0, UNREACHABLE);
  }
  const data = res.ok ? await res.json().catch(() => null) : null;
  const fields = data && [data.epoch, data.time, data.proof];
  if (!fields || !fields.every((f) => typeof f === "string")) throw new ApiError(401, NOT_OURS);
  if ((await mac(key, "ftstudio server", challenge, data.epoch, data.time)) !== data.proof) throw new ApiError(401, NOT_OURS);
  session = { epoch: data.epoch, offset: Number(data.time) * 1000 - Date.now() };
  return session;
}

async function signature(method, url, bodyDigest) {
  const s = await ensureSession();
  const ts = String(Math.floor((Date.now() + s.offset) / 1000));
  const nonce = random(18);
  const sig = await mac(pageKey, "ftstudio request", method, location.host, url.pathname + url.search, ts, nonce, s.epoch, bodyDigest);
  return { epoch: s.epoch, ts, nonce, sig };
}

/** fetch(), signed. A body is a string (digested) or a FormData (an upload: sent unsigned, the studio allows it there). */
export async function authFetch(path, { method = "GET", headers = {}, body, signal } = {}) {
  for (let attempt = 0; ; attempt++) {
    const url = new URL(path, location.href);
    const bodyDigest = body === undefined ? EMPTY_DIGEST : typeof body === "string" ? await digest(body) : "-";
    const { epoch, ts, nonce, sig } = await signature(method, url, bodyDigest);
    const auth = `ftstudio epoch=${epoch}, ts=${ts}, nonce=${nonce}, body=${bodyDigest}, sig=${sig}`;
    let res;
    try {
      res = await fetch(url, { method, headers: { ...headers, Authorization: auth }, body, signal });
    } catch (err) {
      if (err.name !== "AbortError") session = null; // whoever answers next proves itself first
      throw err;
    }
    if (res.status === 401 && attempt === 0) {
      const data = await res.clone().json().catch(() => null);
      if (data && data.code === "session") {
        session = null; // the studio restarted (a new epoch): say hello, then send once more
        continue;
      }
    }
    return res;
  }
}

/** A GET that cannot carry a header (a download), signed in its last query field. */
export async function signedUrl(path) {
  const url = new URL(path, location.href);
  const { epoch, ts, nonce, sig } = await signature("GET", url, EMPTY_DIGEST);
  url.search = `${url.search ? `${url.search}&` : "?"}_auth=${epoch}.${ts}.${nonce}.${sig}`;
  return url.href;
}

/** A link that downloads `path` as `name`: the address is signed at the click (a signature is good once). */
export function downloadLink(path, name, text, attrs = {}) {
  const link = h("a", { ...attrs, href: path, download: name }, text);
  link.addEventListener("click", async (event) => {
    event.preventDefault();
    try {
      const once = h("a", { href: await signedUrl(path), download: name, hidden: true });
      document.body.append(once);
      once.click();
      once.remove();
    } catch (err) {
      link.title = err.message || String(err);
    }
  });
  return link;
}

export async function api(path, { method = "GET", json, form, signal } = {}) {
  const headers = { Accept: "application/json" };
  let body;
  if (json !== undefined) {
    headers["Content-Type"] = "application/json";
    body = JSON.stringify(json);
  } else if (form) {
    body = form;
  }
  let res;
  try {
    res = await authFetch(path, { method, headers, body, signal });
  } catch (err) {
    if (err.name === "AbortError" || err instanceof ApiError) throw err;
    throw new ApiError(0, UNREACHABLE);
  }
  if (res.status === 204) return null;
  if (res.status === 401) {
    // No key, or one of an old token: say how to get in, in the page's words.
    throw new ApiError(401, NOT_LOGGED_IN);
  }
  const text = await res.text();
  let data = null;
  try {
    data = text ? JSON.parse(text) : null;
  } catch {
    data = null;
  }
  if (!res.ok) {
    let detail = data && data.detail;
    let problems = (data && Array.isArray(data.problems) && data.problems) || [];
    if (Array.isArray(detail)) {
      // FastAPI's own request-validation shape: [{loc, msg}]
      problems = detail.map((d) => ({ field: (d.loc || []).filter((x) => x !== "body").join("."), message: d.msg }));
      detail = problems.map((p) => `${p.field}: ${p.message}`).join("; ");
    }
    if (typeof detail !== "string" || !detail) detail = `The studio answered ${res.status} ${res.statusText}`.trim();
    throw new ApiError(res.status, detail, problems);
  }
  return data;
}

export const taskUrl = (id, rest = "") => `/api/tasks/${encodeURIComponent(id)}${rest}`;
