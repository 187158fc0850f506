"""The page under its real Content-Security-Policy, the login URL, and what a web page
from somewhere else can do to a logged-in studio in a real browser: nothing.

The attacker's page is served by a second real HTTP server (another origin) or, for
DNS rebinding, by Chromium itself under a name that resolves to the studio's address.
"""

from __future__ import annotations

import http.server
import threading
import time
from typing import Any

import pytest
from support import wait_for

from .livestudio import CHROMIUM, CHROMIUM_ARGS, LiveStudio

pytestmark = pytest.mark.browser
LNA_CHECKS = ",".join(
    (
        "BlockInsecurePrivateNetworkRequests",
        "PrivateNetworkAccessSendPreflights",
        "PrivateNetworkAccessRespectPreflightResults",
        "LocalNetworkAccessChecks",
    )
)


@pytest.fixture
def scripted_studio(scripted: LiveStudio) -> LiveStudio:
    """The scripted studio (conftest.py), started with the default flags."""
    return scripted.start()


def csp_violations(page: Any) -> list[str]:
    found: list[str] = []
    page.on("console", lambda m: "Content Security Policy" in m.text and found.append(m.text))
    return found


def test_the_login_url_opens_the_page_under_its_policy(browser: Any, scripted_studio: LiveStudio) -> None:
    studio = scripted_studio
    task = studio.api("POST", "/api/tasks", {"name": "scripted steps=3 delay=0.01", "config": {"preset": "cpu-demo"}})
    other = studio.api("POST", "/api/tasks", {"name": "scripted steps=4 delay=0.01", "config": {"preset": "cpu-demo"}})
    studio.wait_status(task["id"], "completed")
    studio.wait_status(other["id"], "completed")
    context = browser.new_context()  # no bypass: the page's own policy applies
    try:
        page = context.new_page()
        violations = csp_violations(page)
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))

        # Not logged in: the page says how to get in, and shows nothing of the studio.
        page.goto(studio.url + "/#/tasks")
        page.get_by_text("ftstudio studio url").first.wait_for()
        assert page.locator("#task-table tbody tr").count() == 0

        page.goto(studio.page_url("#/tasks"))
        page.locator("#task-table tbody tr").first.wait_for()
        assert "login=" not in page.url and page.url.endswith("/#/tasks")  # the code leaves the address bar
        assert context.cookies() == []  # the page signs its requests (test_page_token.py): nothing for a port to take
        page.locator("#studio-version").wait_for()
        # The chart library (vendored uPlot) styles its elements through the CSSOM, which the policy allows:
        # the loss curve, the comparison, and the read-out under the pointer draw without a violation.
        views = (
            ("#/new", "#preset"),
            (f"#/tasks/{task['id']}", "#task-actions button"),
            (f"#/compare?tasks={task['id']},{other['id']}", "#compare-table"),
        )
        for fragment, ready in views:
            page.goto(f"{studio.url}/{fragment}")
            page.locator(ready).first.wait_for()
            if page.locator("div.chart .u-over").count():
                box = page.locator("div.chart .u-over").bounding_box()
                page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
                page.locator(".chart-readout").wait_for()
        page.wait_for_timeout(300)
        assert not violations, violations
        assert not errors, errors
    finally:
        context.close()


class AttackerSite:
    """Another origin: a real HTTP server on its own port serving one page."""

    def __init__(self, html: str) -> None:
        body = html.encode()

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "text/html")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def attack_page(studio_url: str, task_id: str) -> str:
    """A form POST to cancel, a text/plain form dressed as JSON to submit, and a no-cors upload."""
    return f"""<!doctype html><html><body>
<iframe name="sink1"></iframe><iframe name="sink2"></iframe>
<form id="cancel" method="POST" action="{studio_url}/api/tasks/{task_id}/cancel" target="sink1"></form>
<form id="submit" method="POST" enctype="text/plain" action="{studio_url}/api/tasks" target="sink2">
  <input name='{{"name": "pwned", "config": {{"preset": "cpu-demo"}}, "x": "' value='"}}'>
</form>
<script>
  // Each form's frame has its answer (or an error page) once it loads somewhere this page cannot read.
  const answered = (name) => new Promise((resolve) => {{
    const frame = document.querySelector(`iframe[name=${{name}}]`);
    frame.addEventListener("load", () => {{
      try {{ frame.contentWindow.location.href; }} catch {{ resolve(); }}  // still about:blank: not yet
    }});
  }});
  const forms = [answered("sink1"), answered("sink2")];
  document.getElementById("cancel").submit();
  document.getElementById("submit").submit();
  const fd = new FormData();
  fd.append("file", new Blob(['{{"text": "pwned"}}\\n']), "pwned.jsonl");
  const fetches = fetch("{studio_url}/api/datasets", {{method: "POST", mode: "no-cors", credentials: "include", body: fd}})
    .finally(() => fetch("{studio_url}/api/tasks/{task_id}", {{method: "DELETE", mode: "no-cors", credentials: "include"}}))
    .catch(() => null);
  Promise.all([...forms, fetches]).then(() => {{ document.title = "done"; }});
</script></body></html>"""


@pytest.mark.parametrize("attacker_host", ["127.0.0.1", "localhost"])
def test_another_origin_changes_nothing(browser: Any, scripted_studio: LiveStudio, attacker_host: str) -> None:
    """From 127.0.0.1 on another port or from localhost: the other page has no key to sign with, and its
    foreign Origin is refused as well."""
    studio = scripted_studio
    task = studio.api(
        "POST", "/api/tasks", {"name": "scripted steps=100000 delay=0.05", "config": {"preset": "cpu-demo"}}
    )
    studio.wait_status(task["id"], "training")
    before = studio.api("GET", "/api/tasks?limit=100")["total"], studio.api("GET", "/api/datasets")

    site = AttackerSite(attack_page(studio.url, task["id"]))
    context = browser.new_context()
    try:
        page = context.new_page()
        page.goto(studio.page_url("#/tasks"))  # the person is logged in to the studio...
        page.locator("#task-table tbody tr").first.wait_for()
        answers: list[int] = []
        cut: list[str] = []  # refused before its body was read: the browser may see the connection close first
        evil = context.new_page()  # ...and opens another page in the same browser
        evil.on("response", lambda r: r.url.startswith(studio.url + "/api/") and answers.append(r.status))
        evil.on("requestfailed", lambda r: r.url.startswith(studio.url + "/api/") and cut.append(r.url))
        evil.goto(f"http://{attacker_host}:{site.port}/")
        # Done once both fetches have ended and both forms' frames have loaded their answer: the page itself knows
        # (Chromium's report of a frame's response to Playwright once took over 90 s on a loaded machine).
        evil.wait_for_function("document.title === 'done'", timeout=90_000)
        wait_for(lambda: answers or cut, timeout=30, what="an answer the browser reported")
        time.sleep(0.5)
    finally:
        context.close()
        site.close()

    assert (answers or cut) and all(code in (401, 403, 415) for code in answers), (answers, cut)
    assert studio.task(task["id"])["status"] == "training"
    assert (studio.api("GET", "/api/tasks?limit=100")["total"], studio.api("GET", "/api/datasets")) == before


def test_a_rebinding_page_is_refused(browser: Any, scripted_studio: LiveStudio) -> None:
    """A page on the attacker's name whose DNS now points at 127.0.0.1: same-origin to the browser,
    so the browser lets it read answers; the studio refuses the foreign Host."""
    studio = scripted_studio
    task = studio.api(
        "POST", "/api/tasks", {"name": "scripted steps=100000 delay=0.05", "config": {"preset": "cpu-demo"}}
    )
    studio.wait_status(task["id"], "training")
    evil = f"http://rebind.test:{studio.port}"
    script = f"""
      const out = {{}};
      out.list = (await fetch("/api/tasks")).status;
      out.cancel = (await fetch("/api/tasks/{task["id"]}/cancel", {{method: "POST"}})).status;
      out.guess = (await fetch("/api/tasks", {{headers: {{Authorization: "Bearer guess"}}}})).status;
      document.title = JSON.stringify(out);
    """
    # A second browser whose resolver maps the attacker's name to the studio's address. Chromium's own
    # Local Network Access checks would stop this page first; they are off here to show that the studio's
    # Host check holds in browsers (and versions) without them.
    rebound = browser.browser_type.launch(
        executable_path=str(CHROMIUM),
        args=[*CHROMIUM_ARGS, "--host-resolver-rules=MAP rebind.test 127.0.0.1", f"--disable-features={LNA_CHECKS}"],
    )
    try:
        page = rebound.new_page()
        # The attacker's server served this page before the name was rebound to the studio's address.
        page.route(
            f"{evil}/attack.html",
            lambda route: route.fulfill(content_type="text/html", body=f"<script type=module>{script}</script>"),
        )
        page.goto(f"{evil}/attack.html")
        page.wait_for_function("document.title.startsWith('{')", timeout=20_000)
        result = page.evaluate("JSON.parse(document.title)")
    finally:
        rebound.close()
    assert result == {"list": 403, "cancel": 403, "guess": 403}, result
    assert studio.task(task["id"])["status"] == "training"
