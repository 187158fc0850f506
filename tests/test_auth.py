"""Who may talk to the studio: the token, the Host and Origin checks, the login URL,
the security headers, and trust_remote_code as the owner's decision.

The in-process tests (FastAPI's TestClient over the real app and service, its tasks
in the in-memory executor) cover every rule; the subprocess tests check the same
against a real server and the real CLI, as a person at the machine uses them."""

from __future__ import annotations

import base64
import hashlib
import json
import re
import secrets
import socket
import stat
import subprocess
import time
from contextlib import contextmanager

import httpx
import pytest
from support import api_client, in_memory, run_cli, wait_for

from ftstudio.cli.main import main
from ftstudio.home import Home
from ftstudio.studio.policy import Policy
from ftstudio.web.auth import Guard, host_name, load_or_create_token
from ftstudio.web.signing import Nonces, login_code, page_key, request_signature, server_proof

ORIGIN = "http://127.0.0.1:8765"
HOST = "127.0.0.1:8765"


class Page:
    """Signs requests as the studio's page does (static/api.js): logs in with the code, says hello, signs."""

    def __init__(self, client, code: str | None = None) -> None:
        self.client = client
        r = client.post("/api/login", headers={"Authorization": "", "X-Ftstudio-Login": code or self.code()})
        assert r.status_code == 200, r.text
        assert r.headers["cache-control"] == "no-store" and "set-cookie" not in r.headers
        data = r.json()
        self.key = base64.urlsafe_b64decode(data["key"] + "=" * (-len(data["key"]) % 4))
        self.epoch = data["epoch"]

    def code(self) -> str:
        r = self.client.get("/api/hello?challenge=" + "c" * 20, headers={"Authorization": ""})
        return login_code(self.client.token, r.json()["epoch"])

    def auth(self, method: str, target: str, content: bytes = b"", *, ts: float | None = None, **over: str) -> str:
        fields = {
            "epoch": self.epoch,
            "ts": str(int(time.time() if ts is None else ts)),
            "nonce": secrets.token_urlsafe(12),
            "body": hashlib.sha256(content).hexdigest(),
        }
        fields.update(over)
        sig = request_signature(self.key, method=method, host=HOST, target=target, **fields)
        return "ftstudio " + ", ".join(f"{k}={v}" for k, v in {**fields, "sig": sig}.items())

    def request(self, method: str, target: str, content: bytes = b"", **over: str):
        headers = {"Authorization": self.auth(method, target, content, **over)}
        if content:
            headers["Content-Type"] = "application/json"
        return self.client.request(method, target, content=content, headers=headers)


@pytest.fixture
def service(home):
    return in_memory(home, in_server=True)


@pytest.fixture
def client(service):
    with api_client(service) as c:
        r = c.post("/api/tasks", json={"name": "existing", "config": {"preset": "cpu-demo"}})
        assert r.status_code == 201, r.text
        c.task_id = r.json()["id"]
        c.token = load_or_create_token(service.home)
        c.service = service
        yield c


def every_route(client):
    """(method, path) of every API route in the app's own OpenAPI document, path parameters filled in."""
    spec = client.get("/openapi.json").json()
    for path, item in spec["paths"].items():
        concrete = path.replace("{task_id}", client.task_id).replace("{name}", "builtin:sample")
        for method in item:
            yield method.upper(), concrete


def snapshot(client):
    rows = client.service.store._conn().execute("SELECT id, status, name, cancel_requested_at FROM tasks").fetchall()
    return sorted(tuple(r) for r in rows), sorted(p.name for p in client.service.home.datasets.iterdir())


# -- the token ------------------------------------------------------------------------------


def test_without_the_token_every_api_route_but_health_is_401(client):
    routes = list(every_route(client))
    assert len(routes) >= 15
    before = snapshot(client)
    for method, path in [*routes, ("GET", "/docs"), ("GET", "/openapi.json"), ("GET", "/redoc")]:
        for headers in ({"Authorization": ""}, {"Authorization": "Bearer wrong-token-000000"}):
            r = client.request(method, path, headers={**headers, "Origin": ORIGIN})
            if path == "/api/health":
                assert r.status_code == 200
                assert r.json() == {"status": "ok", "version": r.json()["version"]}  # nothing about the machine
                continue
            assert r.status_code == 401, (method, path, r.status_code)
            detail = r.json()["detail"]
            # TestClient's peer is not loopback: the token's path is not told (see the real-server test).
            assert "ftstudio studio url" in detail and "data home" in detail and "\n" not in detail
            assert str(client.service.home.root) not in detail
    assert snapshot(client) == before


def test_with_the_token_health_tells_more(client):
    h = client.get("/api/health").json()
    assert h["status"] == "ok" and h["home"] == str(client.service.home.root) and h["pid"]


def test_the_token_file_is_private_stable_and_never_logged(service):
    token = load_or_create_token(service.home)
    path = service.home.root / "token"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert len(token) >= 32 and load_or_create_token(service.home) == token
    path.chmod(0o644)  # e.g. restored from a backup
    assert load_or_create_token(service.home) == token
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert not service.home.log.exists() or token not in service.home.log.read_text()


# -- the Host and Origin checks ---------------------------------------------------------------


@pytest.mark.parametrize(
    "host",
    [
        "evil.example",
        "evil.example:8765",
        "127.0.0.1.nip.io:8765",
        "localhost.evil.example",
        "",
        "a b",
        "[::1",
        "evil.localhost",
    ],
)
def test_a_foreign_host_is_403_even_with_the_token(client, host):
    before = snapshot(client)
    for method, path in (("GET", "/api/tasks"), ("POST", f"/api/tasks/{client.task_id}/cancel"), ("GET", "/")):
        r = client.request(method, path, headers={"Host": host, "Origin": f"http://{host}"})
        assert r.status_code == 403, (host, method, path)
        assert "host name" in r.json()["detail"]
    assert snapshot(client) == before


@pytest.mark.parametrize(
    "host",
    ["127.0.0.1:8765", "localhost:8765", "[::1]:8765", "127.1.2.3:8765", "LOCALHOST.", "127.1", "[::ffff:127.0.0.1]"],
)
def test_loopback_hosts_are_answered(client, host):
    assert client.get("/api/tasks", headers={"Host": host}).status_code == 200


def test_allowed_and_remote_hosts():
    guard = Guard(token="t" * 32, port=8765, allow_hosts=("studio.lan",))
    assert guard.host_ok("studio.lan:8765") and not guard.host_ok("other.lan:8765")
    assert not guard.host_ok("192.168.1.5:8765")  # bound to loopback: nobody else should be asking
    remote = Guard(token="t" * 32, port=8765, remote=True)
    assert remote.host_ok("192.168.1.5:8765") and remote.host_ok("[fe80::1]:8765")
    assert not remote.host_ok("rebind.attacker.example:8765")  # a DNS name is how rebinding works
    assert host_name("[::1]:8765") == "::1" and host_name("x:99999999") is None
    proxied = Guard(token="t" * 32, port=8765, allow_origins=("https://box.lan",))
    assert proxied.origin_ok("https://box.lan", "127.0.0.1:8765")  # a TLS proxy in front
    assert not proxied.origin_ok("https://evil.lan", "127.0.0.1:8765")


@pytest.mark.parametrize(
    "origin",
    ["http://evil.example", "null", "http://127.0.0.1:9999", "https://127.0.0.1:8765", "http://localhost:8765"],
)
def test_a_foreign_origin_changes_nothing(client, origin):
    before = snapshot(client)
    r = client.post(f"/api/tasks/{client.task_id}/cancel", headers={"Origin": origin})
    assert r.status_code == 403 and "other web pages" in r.json()["detail"]
    r = client.post("/api/tasks", json={"config": {"preset": "cpu-demo"}}, headers={"Origin": origin})
    assert r.status_code == 403
    r = client.post("/api/datasets", files={"file": ("x.jsonl", b'{"text": "a"}\n')}, headers={"Origin": origin})
    assert r.status_code == 403
    # Every route that changes state (pause, freeze, resume, retry, extend, delete, ...), with the token.
    changes = [(m, p) for m, p in every_route(client) if m in ("POST", "PUT", "PATCH", "DELETE")]
    assert len(changes) >= 9
    for method, path in changes:
        r = client.request(method, path, json={"epochs": 1}, headers={"Origin": origin})
        assert r.status_code == 403, (method, path, r.status_code)
    assert snapshot(client) == before


def test_a_signed_request_is_good_once_for_this_run_and_this_body_only(client):
    page = Page(client)
    assert page.key == page_key(client.token)
    assert page.request("GET", "/api/tasks").status_code == 200
    before = snapshot(client)
    body = json.dumps({"config": {"preset": "cpu-demo"}}).encode()
    auth = page.auth("POST", "/api/tasks", body)
    headers = {"Authorization": auth, "Content-Type": "application/json"}
    assert client.post("/api/tasks", content=body, headers=headers).status_code == 201
    again = client.post("/api/tasks", content=body, headers=headers)  # caught and sent once more
    assert again.status_code == 401 and again.json()["code"] == "replayed"
    other = json.dumps({"config": {"preset": "cpu-demo"}, "name": "swapped"}).encode()
    swapped = client.post(
        "/api/tasks", content=other, headers={**headers, "Authorization": page.auth("POST", "/api/tasks", body)}
    )
    assert swapped.status_code == 401 and swapped.json()["code"] == "signature"
    assert len(snapshot(client)[0]) == len(before[0]) + 1
    # Another run of the studio, a clock far off, another key, another path: refused, each saying which.
    assert page.request("GET", "/api/tasks", epoch="x" * 22).json()["code"] == "session"
    assert page.request("GET", "/api/tasks", ts=time.time() - 600).json()["code"] == "session"
    stranger = Page.__new__(Page)
    stranger.__dict__.update(page.__dict__, key=b"k" * 32)
    assert stranger.request("GET", "/api/tasks").json()["code"] == "signature"
    moved = client.get("/api/datasets", headers={"Authorization": page.auth("GET", "/api/tasks")})
    assert moved.status_code == 401 and moved.json()["code"] == "signature"
    # A body left unsigned is taken for an upload only; a GET says its body is empty.
    cancel = f"/api/tasks/{client.task_id}/cancel"
    r = client.post(cancel, headers={"Authorization": page.auth("POST", cancel, body="-")})
    assert r.status_code == 401 and r.json()["code"] == "signature"
    assert page.request("GET", "/api/tasks", body="0" * 64).json()["code"] == "signature"
    for bad in ("ftstudio epoch=a", "ftstudio epoch=a, ts=1, nonce=n, body=b, sig=s, sig=t", "ftstudio a=b=c"):
        assert client.get("/api/tasks", headers={"Authorization": bad}).status_code == 401
    assert client.service.store.get(client.task_id).status != "cancelled"


def test_a_signed_address_downloads_once(client):
    page = Page(client)
    target = "/api/tasks?limit=5"
    auth = page.auth("GET", target)
    fields = dict(part.strip().split("=", 1) for part in auth.removeprefix("ftstudio ").split(","))
    signed = f"{target}&_auth={fields['epoch']}.{fields['ts']}.{fields['nonce']}.{fields['sig']}"
    assert client.get(signed, headers={"Authorization": ""}).status_code == 200
    assert client.get(signed, headers={"Authorization": ""}).json()["code"] == "replayed"
    assert client.get(signed.replace("limit=5", "limit=6"), headers={"Authorization": ""}).status_code == 401
    moved = f"/api/tasks?_auth={fields['epoch']}.{fields['ts']}.{fields['nonce']}.{fields['sig']}&limit=5"
    assert client.get(moved, headers={"Authorization": ""}).status_code == 401  # the signature must come last
    post = client.post(f"/api/tasks/{client.task_id}/cancel?_auth=a.1.n.s", headers={"Authorization": ""})
    assert post.status_code == 401  # a change is never signed in its address


def test_nonces_are_taken_once_and_their_memory_is_bounded():
    nonces = Nonces(cap=3)
    assert nonces.take("a", 0) is True and nonces.take("a", 1) is False
    assert nonces.take("b", 0) and nonces.take("c", 0)
    assert nonces.take("d", 1) is None  # full of nonces still inside the clock window: refused, not forgotten
    assert nonces.take("d", 1000) is True and nonces.take("a", 1000) is True  # the old ones made room


def test_the_login_code_and_the_hello(client):
    no = {"Authorization": ""}
    hello = client.get("/api/hello?challenge=" + "a" * 16, headers=no)
    assert hello.status_code == 200 and hello.headers["cache-control"] == "no-store"
    data = hello.json()
    assert data["proof"] == server_proof(page_key(client.token), "a" * 16, data["epoch"], data["time"])
    assert client.token not in hello.text
    for bad in ("", "short", "a" * 129, "a" * 15 + "!", "a" * 16 + "%0a"):
        assert client.get(f"/api/hello?challenge={bad}", headers=no).status_code == 400, bad
    assert client.post("/api/hello?challenge=" + "a" * 16, headers=no).status_code == 405
    wrong = client.post("/api/login", headers={**no, "X-Ftstudio-Login": login_code(client.token, "another-run")})
    assert wrong.status_code == 401 and "ftstudio studio url" in wrong.json()["detail"]
    assert client.post("/api/login", headers=no).status_code == 401
    assert client.get("/api/login", headers=no).status_code == 405
    foreign = client.post(
        "/api/login", headers={**no, "X-Ftstudio-Login": Page(client).code(), "Origin": "http://evil.example"}
    )
    assert foreign.status_code == 403
    assert client.post("/api/login", headers={**no, "Host": "evil.example"}).status_code == 403
    # The cookie and the `?token=` link of earlier releases are no credential any more.
    old = client.get(f"/?token={client.token}", headers=no, follow_redirects=False)
    assert old.status_code == 200 and "set-cookie" not in old.headers
    cookie = {"Cookie": f"ftstudio-token-8765={client.token}", "Authorization": ""}
    assert client.get("/api/tasks", headers=cookie).status_code == 401


@pytest.mark.parametrize(
    "ctype", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"]
)
def test_state_changes_take_json_only(client, ctype):
    before = snapshot(client)
    body = json.dumps({"config": {"preset": "cpu-demo"}})
    r = client.post("/api/tasks", content=body, headers={"Content-Type": ctype})
    assert r.status_code == 415 and "application/json" in r.json()["detail"]
    r = client.post(f"/api/tasks/{client.task_id}/cancel", content=b"a=1", headers={"Content-Type": ctype})
    assert r.status_code == 415
    assert snapshot(client) == before
    r = client.post("/api/datasets", content=b"{}", headers={"Content-Type": "application/json"})
    assert r.status_code == 415 and "multipart/form-data" in r.json()["detail"]


def test_a_json_body_is_bounded(client):
    huge = json.dumps({"name": "x" * (2 << 20), "config": {}})
    r = client.post("/api/tasks", content=huge, headers={"Content-Type": "application/json"})
    assert r.status_code == 413

    def chunks():
        yield b'{"name": "'
        for _ in range(40):
            yield b"x" * (64 << 10)
        yield b'", "config": {}}'

    r = client.post("/api/tasks", content=chunks(), headers={"Content-Type": "application/json"})
    assert r.status_code == 413


# -- the login URL and the headers --------------------------------------------------------------


def test_security_headers_and_no_cors(client):
    for path in ("/", "/static/app.js", "/api/tasks", "/api/health"):
        r = client.get(path, headers={"Origin": ORIGIN})
        assert r.headers["x-content-type-options"] == "nosniff"
        assert r.headers["referrer-policy"] == "no-referrer"
        assert r.headers["x-frame-options"] == "DENY"
        csp = r.headers["content-security-policy"]
        assert "frame-ancestors 'none'" in csp and "script-src 'self'" in csp and "unsafe-inline" not in csp
        assert not any(h.startswith("access-control-") for h in r.headers)
    r = client.options(
        "/api/tasks",
        headers={"Origin": "http://evil.example", "Access-Control-Request-Method": "POST"},
    )
    assert r.status_code == 403 and not any(h.startswith("access-control-") for h in r.headers)


# -- remote code is the owner's decision ----------------------------------------------------------


def remote_code_model(tmp_path):
    """A local "model" whose config asks transformers to import its own code, which would leave a mark."""
    model = tmp_path / "crafted-model"
    model.mkdir()
    mark = tmp_path / "pwned"
    (model / "config.json").write_text(
        json.dumps(
            {"model_type": "crafted", "auto_map": {"AutoConfig": "evil.Config", "AutoModelForCausalLM": "evil.M"}}
        )
    )
    (model / "evil.py").write_text(f"open({str(mark)!r}, 'w').write('ran')\n")
    return model, mark


def test_trust_remote_code_over_http_is_refused_unless_the_owner_allowed_it(client, tmp_path):
    model, mark = remote_code_model(tmp_path)
    before = snapshot(client)
    config = {"preset": "cpu-demo", "model": {"name": str(model), "trust_remote_code": True}}
    r = client.post("/api/tasks", json={"config": config})
    assert r.status_code == 422
    detail = r.json()["detail"]
    assert "model.trust_remote_code" in detail and "--allow-remote-code" in detail and "\n" not in detail
    assert snapshot(client) == before and not mark.exists()


def test_allow_remote_code_lets_a_request_set_it(home, tmp_path):
    service = in_memory(home, in_server=True, policy=Policy(allow_remote_code=True))
    with api_client(service) as c:
        r = c.post("/api/tasks", json={"name": "allowed", "config": {"model": {"trust_remote_code": True}}})
        assert r.status_code == 201, r.text
        assert r.json()["config"]["model"]["trust_remote_code"] is True


def test_the_cli_may_set_trust_remote_code(scripted):
    """The real command: it submits as the person at the terminal (trusted), whom no studio policy limits."""
    r = run_cli(
        scripted, "submit", "--name", "scripted steps=1", "--set", "model.trust_remote_code=true", scripted=True
    )
    assert r.returncode == 0, r.stderr


# -- a real server, as a person at the machine uses it ------------------------------------------------


@contextmanager
def started(home, *args):
    """`ftstudio studio start ARGS` that must succeed, stopped afterwards whatever happens."""
    r = run_cli(home, "studio", "start", *args)
    try:
        assert r.returncode == 0, r.stderr
        yield r
    finally:
        run_cli(home, "studio", "stop")


@pytest.mark.process
def test_studio_start_prints_a_login_url_that_opens_the_page(home):
    r = run_cli(home, "studio", "start", "--port", "0")
    try:
        assert r.returncode == 0, r.stderr
        url = re.search(r"(http://127\.0\.0\.1:\d+/\?login=\S+)", r.stdout).group(1)
        token = (home / "token").read_text().strip()
        epoch = json.loads((home / "studio.json").read_text())["epoch"]
        assert url.endswith(f"?login={login_code(token, epoch)}") and token not in url
        assert run_cli(home, "studio", "url").stdout.strip() == url
        assert run_cli(home, "studio", "token").stdout.strip() == token
        base = url.split("?")[0]
        with httpx.Client(base_url=base) as browser:
            refused = browser.get("/api/tasks")
            assert (
                refused.status_code == 401 and str(home / "token") in refused.json()["detail"]
            )  # said on this machine
            assert browser.get(url).status_code == 200  # the page, which trades the code for its key
            key = browser.post("/api/login", headers={"X-Ftstudio-Login": url.split("login=")[1]}).json()["key"]
            assert key and token not in key
            assert browser.get(base, headers={"Host": "evil.example"}).status_code == 403
        assert token not in (home / "studio.log").read_text()
        # A restart is a new run: the old link is worth nothing, `studio url` prints the new one.
        run_cli(home, "studio", "stop")
        assert run_cli(home, "studio", "start", "--port", base.rsplit(":", 1)[1].rstrip("/")).returncode == 0
        again = run_cli(home, "studio", "url").stdout.strip()
        assert again != url
        with httpx.Client(base_url=base) as browser:
            assert browser.post("/api/login", headers={"X-Ftstudio-Login": url.split("login=")[1]}).status_code == 401
            assert browser.post("/api/login", headers={"X-Ftstudio-Login": again.split("login=")[1]}).status_code == 200
    finally:
        run_cli(home, "studio", "stop")


@pytest.mark.process
def test_studio_url_without_a_studio_says_how_to_start_one(home):
    r = run_cli(home, "studio", "url")
    assert r.returncode == 3 and "ftstudio studio start" in r.stderr


@pytest.mark.process
@pytest.mark.parametrize(
    ("bind", "shown", "warns"),
    [("0.0.0.0", "127.0.0.1", True), ("::", "[::1]", True), ("0", "127.0.0.1", True), ("127.1", "127.0.0.1", False)],
)
def test_every_bind_prints_a_url_that_answers_and_warns_beyond_loopback(home, bind, shown, warns):
    with started(home, "--host", bind, "--port", "0") as r:
        assert re.search(rf"running at http://{re.escape(shown)}:\d+/\?login=", r.stdout), r.stdout
        assert ("warning:" in r.stderr) == warns, r.stderr
        if warns:
            assert "unencrypted" in r.stderr and "--certfile" in r.stderr
            wait_for(lambda: "unencrypted" in (home / "studio.log").read_text(), what="the warning in studio.log")
        url = re.search(r"(http://\S+)/\?login=", r.stdout).group(1)
        token = (home / "token").read_text().strip()
        assert httpx.get(f"{url}/api/tasks", headers={"Authorization": f"Bearer {token}"}).status_code == 200
        assert httpx.get(f"{url}/api/tasks").status_code == 401


def ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.process
def test_localhost_is_both_loopbacks_and_a_twin_taken_by_another_program_stops_the_start(home):
    """A browser may reach 127.0.0.1 or ::1 for `localhost:PORT`: the studio holds both, so nobody else can
    take the other and receive what the owner's tab sends there."""
    if not ipv6_loopback():
        pytest.skip("this machine has no IPv6 loopback")
    with started(home, "--host", "localhost", "--port", "0") as r:
        url = re.search(r"(http://localhost:\d+)/\?login=", r.stdout).group(1)
        port = int(url.rsplit(":", 1)[1])
        token = (home / "token").read_text().strip()
        for base in (f"http://127.0.0.1:{port}", f"http://[::1]:{port}"):
            answer = httpx.get(f"{base}/api/tasks", headers={"Authorization": f"Bearer {token}"})
            assert answer.status_code == 200, base
    with socket.socket(socket.AF_INET6) as twin:
        twin.bind(("::1", port))
        twin.listen()
        r = run_cli(home, "studio", "start", "--host", "localhost", "--port", str(port))
        assert r.returncode != 0 and f"port {port} on [::1] is in use by another program" in r.stderr, r.stderr
        assert "--port" in r.stderr and "Traceback" not in r.stderr
    assert run_cli(home, "studio", "url").returncode == 3  # nothing started


# -- a request cannot exhaust the machine ----------------------------------------------------------


def test_a_burst_of_submits_queues_no_more_than_the_limit(home):
    service = in_memory(home, in_server=True, policy=Policy(max_pending=3))
    with api_client(service) as c:
        answers = [
            c.post("/api/tasks", json={"name": "runs long", "config": {"preset": "cpu-demo"}}) for _ in range(12)
        ]
        codes = [r.status_code for r in answers]
        assert codes.count(201) == 3 and codes.count(429) == 9, codes
        detail = answers[-1].json()["detail"]
        assert "3 fine-tunes are already queued or running" in detail and "--max-pending" in detail
        assert service.store.page_of_tasks(limit=100)[1] == 3
        # One ends: there is room again.
        first = answers[0].json()["id"]
        c.post(f"/api/tasks/{first}/cancel").raise_for_status()
        wait_for(lambda: service.store.get(first).status == "cancelled", timeout=30, what="the cancel to finish")
        r = c.post("/api/tasks", json={"name": "one more", "config": {"preset": "cpu-demo"}})
        assert r.status_code == 201, r.text
    # The owner at the terminal is never refused: the CLI submits trusted (test_the_cli_may_set_trust_remote_code
    # runs the real command).
    assert service.submit({"preset": "cpu-demo"}, "from the terminal", trusted=True).status == "queued"


@pytest.mark.process
def test_https_with_certfile_and_keyfile(home, tmp_path):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    made = subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
         "-keyout", str(key), "-out", str(cert)],
        capture_output=True,
    )  # fmt: skip
    if made.returncode != 0:
        pytest.skip(f"openssl could not make a certificate: {made.stderr[-200:]!r}")
    r = run_cli(home, "studio", "start", "--port", "0", "--certfile", str(cert), "--keyfile", str(key))
    try:
        assert r.returncode == 0, r.stderr
        url = re.search(r"(https://127\.0\.0\.1:\d+/\?login=\S+)", r.stdout).group(1)
        assert "unencrypted" not in r.stderr
        with httpx.Client(verify=False) as browser:
            assert browser.get(url).status_code == 200
            login = browser.post(url.split("?")[0] + "api/login", headers={"X-Ftstudio-Login": url.split("login=")[1]})
            assert login.status_code == 200 and login.json()["key"]
    finally:
        run_cli(home, "studio", "stop")
    bad = run_cli(home, "studio", "start", "--certfile", str(cert))
    assert bad.returncode == 2 and "--certfile and --keyfile" in bad.stderr


# -- what the review found -------------------------------------------------------------------------


def test_the_login_link_survives_extra_fields(client):
    code = Page(client).code()
    fields = "&".join(f"utm_{i}=x" for i in range(20))
    assert client.get(f"/?{fields}&login={code}", headers={"Authorization": ""}).status_code == 200
    Page(client, code)  # the code still buys the key


def test_the_api_docs_pages_are_off_and_the_document_behind_the_token(client):
    for path in ("/docs", "/redoc"):
        assert client.get(path, headers={"Authorization": ""}).status_code == 401
        assert client.get(path).status_code == 404
    assert client.get("/openapi.json").json()["components"]["schemas"]["Error"]


def test_racing_token_creators_agree_and_the_home_is_private(tmp_path):
    import threading

    home = Home(tmp_path / "fresh").ensure()
    assert stat.S_IMODE(home.root.stat().st_mode) == 0o700
    got: list[str] = []
    threads = [threading.Thread(target=lambda: got.append(load_or_create_token(home))) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(got)) == 1 and len(got) == 8
    assert sorted(p.name for p in home.root.iterdir()) == ["datasets", "models", "tasks", "token"]


@pytest.mark.process
def test_a_body_sent_to_a_public_path_is_not_waited_for(home):
    r = run_cli(home, "studio", "start", "--port", "0")
    try:
        port = int(re.search(r"127\.0\.0\.1:(\d+)/", r.stdout).group(1))
        for path in ("/nothing", "/", "/api/health"):
            with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                s.sendall(
                    f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                    "Content-Length: 1000000\r\n\r\n0123456789".encode()
                )
                answer = s.recv(4096).decode()  # at once, not after a megabyte that never comes
            assert answer.startswith(("HTTP/1.1 404", "HTTP/1.1 405")), answer
    finally:
        run_cli(home, "studio", "stop")


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--allow-path", "/no/such/dir"], "--allow-path: /no/such/dir is not a directory"),
        (["--allow-host", "bad host!"], "--allow-host: 'bad host!' is not a host name"),
        (["--allow-origin", "evil"], "--allow-origin: 'evil' is not an origin"),
        (["--allow-origin", "https://box.lan/path"], "--allow-origin"),
        (["--max-upload-mb", "0"], "--max-upload-mb: must be between 1 and"),
        (["--max-row-kb", "-1"], "--max-row-kb: must be between 1 and"),
        (["--max-pending", "0"], "--max-pending: must be between 1 and 100000"),
        (["--slots", "0"], "--slots: must be between 1 and 256"),
        (["--port", "70000"], "--port: must be between 0 and 65535"),
        (["--keyfile", "/etc/hostname"], "--certfile and --keyfile: give both, or neither"),
    ],
)
def test_bad_studio_flags_are_one_line_and_start_nothing(home, args, needle, capsys):
    """In this process: were anything started, the fast tier's guard (conftest.py) would fail the test. The real
    command's exit code and one line: test_studio_url_without_a_studio_says_how_to_start_one."""
    assert main(["studio", "start", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and needle in err and err.count("\n") == 1, err
    assert main(["studio", "status"]) == 3
