"""Bad input gets a one-line 4xx naming the problem and the fix, and changes nothing:
no task is created, no file is written, the other tasks are untouched, and nothing
from the request is ever executed."""

import io
import json
import os
from pathlib import Path

import pytest
from support import api_client, in_memory

INJECTION = 'x"); import os; os.system("touch pwned") #{__import__("os")}'


@pytest.fixture
def client(home, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    service = in_memory(home, in_server=True)  # its tasks "run" in memory: the routes are the point here
    with api_client(service) as c:
        # One task that every bad request must leave alone.
        r = c.post("/api/tasks", json={"name": "existing", "config": {"preset": "cpu-demo"}})
        assert r.status_code == 201
        c.existing = r.json()["id"]
        c.service = service
        yield c


def snapshot(client):
    rows = client.service.store._conn().execute("SELECT id, status, name, config FROM tasks ORDER BY id").fetchall()
    files = sorted(str(p.relative_to(client.service.home.root)) for p in client.service.home.datasets.rglob("*"))
    return [tuple(r) for r in rows], files


def one_line(r, status, *needles):
    assert r.status_code == status, r.text
    detail = r.json()["detail"]
    assert isinstance(detail, str) and "\n" not in detail and "Traceback" not in detail
    for needle in needles:
        assert needle in detail, detail
    return r.json()


@pytest.mark.parametrize(
    ("config", "needles"),
    [
        ({"model": {"name": "builtin:nope"}}, ["model.name (--model)", "unknown built-in model"]),
        ({"model": {"name": "/no/such/model"}}, ["model.name (--model)", "/no/such/model"]),
        ({"model": {"name": "acme/not-a-real-model"}}, ["not in the local Hugging Face cache"]),
        ({"model": {"name": INJECTION}}, ["model.name (--model)", "is not a hub id"]),
        ({"data": {"path": "/no/such/data.jsonl"}}, ["data.path (--dataset)"]),
        ({"optim": {"learning_rate": -0.001}}, ["optim.learning_rate (--lr): must be positive"]),
        ({"optim": {"learning_rate": "fast"}}, ["optim.learning_rate (--lr): must be a number"]),
        ({"lora": {"rank": 0}, "optim": {"batch_size": -2}}, ["lora.rank", "optim.batch_size"]),
        ({"bogus": {"x": 1}}, ["bogus: unknown setting"]),
        ({"preset": "huge"}, ["unknown preset 'huge'"]),
    ],
)
def test_bad_configs_are_refused_before_anything_is_created(client, config, needles):
    before = snapshot(client)
    body = one_line(client.post("/api/tasks", json={"config": {"preset": "cpu-demo", **config}}), 422, *needles)
    assert body["problems"] and all(p["message"] for p in body["problems"])
    assert snapshot(client) == before
    assert not any(Path(d, "pwned").exists() for d in (os.getcwd(), client.service.home.root, "/tmp"))


def test_a_malformed_jsonl_line_is_named_on_submit(client):
    bad = client.service.home.root / "mine" / "broken.jsonl"  # under the data home: a folder it may read
    bad.parent.mkdir()
    good = json.dumps({"instruction": "say hi", "output": "hi"})
    bad.write_text(f"{good}\n{good}\n{{not json\n{good}\n")
    before = snapshot(client)
    one_line(client.post("/api/tasks", json={"config": {"data": {"path": str(bad)}}}), 422, "broken.jsonl line 3")
    assert snapshot(client) == before


@pytest.mark.parametrize(
    ("content", "needles"),
    [
        (None, ["no dataset", "check the path"]),
        ("", ["prompts.jsonl has no rows; add prompts to it"]),
        ('{"instruction": "Hi?"}\n{not json\n', ["prompts.jsonl line 2: not valid JSON"]),
        ('{"question": "Hi?"}\n', ["cannot tell the data shape from columns (question)"]),
        (
            '{"messages": [{"role": "system", "content": "Be brief."}]}\n',
            ["none of its 1 rows is a usable messages prompt"],
        ),
    ],
)
def test_a_held_out_prompts_file_that_cannot_serve_is_refused_on_submit(client, content, needles):
    prompts = client.service.home.root / "mine" / "prompts.jsonl"  # under the data home: a folder it may read
    prompts.parent.mkdir()
    if content is not None:
        prompts.write_text(content)
    before = snapshot(client)
    r = client.post("/api/tasks", json={"config": {"preset": "cpu-demo", "evaluation": {"prompts": str(prompts)}}})
    body = one_line(r, 422, "evaluation.prompts (--eval-prompts)", *needles)
    assert [p["field"] for p in body["problems"]] == ["evaluation.prompts (--eval-prompts)"]
    assert snapshot(client) == before


def test_a_malformed_upload_names_the_line_and_is_not_kept(client):
    good = json.dumps({"instruction": "say hi", "output": "hi"}).encode()
    data = good + b"\n" + good + b"\n" + b'{"instruction": "x", "output": \n'
    before = snapshot(client)
    r = client.post("/api/datasets", files={"file": ("bad.jsonl", io.BytesIO(data), "application/jsonl")})
    one_line(r, 422, "bad.jsonl line 3")
    assert snapshot(client) == before
    names = [d["name"] for d in client.get("/api/datasets").json()["datasets"]]
    assert "bad.jsonl" not in names


def test_a_good_upload_is_listed_and_a_task_takes_it_by_name(client):
    rows = b"\n".join(
        json.dumps({"instruction": f"count to {i}", "output": " ".join(map(str, range(i)))}).encode()
        for i in range(1, 30)
    )
    r = client.post("/api/datasets", files={"file": ("../../evil name.jsonl", io.BytesIO(rows), "application/jsonl")})
    assert r.status_code == 201, r.text
    up = r.json()
    assert up["name"] == "evil-name.jsonl" and up["rows"] == 29 and up["format"] == "alpaca"
    assert Path(up["path"]).parent == client.service.home.datasets
    r = client.post("/api/tasks", json={"name": "by name", "config": {"data": {"path": up["name"]}}})
    assert r.status_code == 201, r.text


@pytest.mark.parametrize("name", ["data.exe", "data.py", "noext"])
def test_uploads_other_than_datasets_are_refused(client, name):
    r = client.post("/api/datasets", files={"file": (name, io.BytesIO(b"{}"), "application/octet-stream")})
    one_line(r, 422, "upload .json, .jsonl, .csv, .parquet or .txt")


def test_requests_that_are_not_json_get_one_line(client):
    before = snapshot(client)
    r = client.post("/api/tasks", content=b"{not json", headers={"content-type": "application/json"})
    one_line(r, 422)
    r = client.post("/api/tasks", json={"config": "not an object"})
    one_line(r, 422)
    assert snapshot(client) == before


@pytest.mark.parametrize("task_id", ["20990101-0000-ffffff", "..", "...", "a" * 100, "UPPER-case-id"])
def test_unknown_task_ids_are_404_everywhere(client, task_id):
    for method, path in [
        ("GET", f"/api/tasks/{task_id}"),
        ("POST", f"/api/tasks/{task_id}/cancel"),
        ("DELETE", f"/api/tasks/{task_id}"),
        ("GET", f"/api/tasks/{task_id}/logs"),
        ("GET", f"/api/tasks/{task_id}/metrics"),
        ("GET", f"/api/tasks/{task_id}/samples"),
    ]:
        r = client.request(method, path)
        assert r.status_code == 404, (method, path, r.text)


def test_a_dataset_can_be_previewed_by_name(client):
    sample = client.get("/api/datasets/builtin:sample").json()
    assert sample["format"] == "alpaca" and sample["rows"] > 100 and len(sample["preview"]) == 5
    r = client.get("/api/datasets/..%2F..%2Fetc%2Fpasswd")
    assert r.status_code == 404
    one_line(client.get("/api/datasets/nope.jsonl"), 404, "no dataset 'nope.jsonl'")


def test_the_page_is_never_served_stale(client):
    assert client.get("/").headers["cache-control"] == "no-cache"
    assert client.get("/static/app.js").headers["cache-control"] == "no-cache"


def _special_files(root: Path) -> dict[str, Path]:
    """A named pipe, a Unix socket and (as root) a character device like /dev/zero, under the data home."""
    import socket
    import stat

    root.mkdir(exist_ok=True)
    made = {"FIFO": root / "pipe.jsonl", "socket": root / "sock.jsonl"}
    os.mkfifo(made["FIFO"])
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(made["socket"]))
    if os.geteuid() == 0:
        made["character device"] = root / "zero.jsonl"
        os.mknod(made["character device"], 0o600 | stat.S_IFCHR, os.makedev(1, 5))
    return made


def test_a_path_that_is_not_a_regular_file_is_refused_at_once_and_blocks_no_thread(client):
    """A FIFO would block a plain open() until someone writes to it: every such submit held a worker thread
    forever, and 41 of them starved the API. Each kind now gets a 4xx at once, naming what it is."""
    import time

    before = snapshot(client)
    for kind, path in _special_files(client.service.home.root / "odd").items():
        t0 = time.monotonic()
        r = client.post("/api/tasks", json={"config": {"data": {"path": str(path)}}})
        took = time.monotonic() - t0
        body = one_line(r, 422, "data.path (--dataset)", path.name, "not a dataset file")
        assert kind in body["detail"], body
        assert took < 1.0, (kind, took)
    assert snapshot(client) == before


def test_uploads_of_one_name_at_once_each_get_their_own_dataset(client):
    """16 uploads named alike, at once: 16 datasets, none replaced, no name handed out twice."""
    from concurrent.futures import ThreadPoolExecutor

    row = lambda n: json.dumps({"instruction": f"upload {n}", "output": "ok"}).encode() + b"\n"  # noqa: E731

    def upload(n: int) -> dict:
        return client.service.upload_dataset("same.jsonl", io.BytesIO(row(n) * 3))

    with ThreadPoolExecutor(16) as pool:
        got = list(pool.map(upload, range(16)))
    names = [g["name"] for g in got]
    assert len(set(names)) == 16 and "same.jsonl" in names, names
    contents = {(client.service.home.datasets / n).read_bytes() for n in names}
    assert contents == {row(n) * 3 for n in range(16)}  # each upload is in its own file, none overwritten
