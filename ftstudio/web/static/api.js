// The studio's HTTP API: JSON in, JSON out, errors as ApiError with field problems.

export class ApiError extends Error {
  constructor(status, detail, problems = []) {
    super(detail);
    this.status = status;
    this.detail = detail;
    this.problems = problems;
  }
}

export async function api(path, { method = "GET", json, form, signal } = {}) {
  const opts = { method, headers: { Accept: "application/json" }, signal };
  if (json !== undefined) {
    opts.headers["Content-Type"] = "application/json";
    opts.body = JSON.stringify(json);
  } else if (form) {
    opts.body = form;
  }
  let res;
  try {
    res = await fetch(path, opts);
  } catch (err) {
    if (err.name === "AbortError") throw err;
    throw new ApiError(0, "The studio is not reachable. Is it running? (ftstudio studio start)");
  }
  if (res.status === 204) return null;
  if (res.status === 401) {
    // The login cookie is missing or belongs to an old token: say how to get in, in the page's words.
    throw new ApiError(401, "This browser is not logged in to the studio: open the link that `ftstudio studio url` prints on the machine that runs it.");
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
