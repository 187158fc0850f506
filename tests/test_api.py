"""The HTTP API: what a route answers, in this process over the in-memory executor (the fast tier), and
what needs a real studio server process and real runners (scripted trainer): a run end to end, the live
stream, cancel reaching every process, a second server, the descriptors a runner inherits."""

import json
import time

import httpx
import pytest
from support import api_client, in_memory, wait_for

from ftstudio.execution.procs import tagged
from ftstudio.studio import lifecycle
from ftstudio.training.evaluation import write_stage


@pytest.fixture
def studio(studio_factory):
    return studio_factory(scripted=True).start()


@pytest.fixture
def client(home):
    """The app over a service whose tasks "run" in the in-memory executor, in this process."""
    service = in_memory(home, in_server=True)
    with api_client(service) as c:
        c.service = service
        yield c


def posted(client, name, **config):
    r = client.post("/api/tasks", json={"name": name, "config": {"preset": "cpu-demo", **config}})
    assert r.status_code == 201, r.text
    return r.json()


def synced(client, task_id):
    """The task after the supervisor's look (no watch loop runs in this process)."""
    client.service.supervisor.sync(client.service.store.get(task_id))
    return client.get(f"/api/tasks/{task_id}").json()


def create(studio, name, **config):
    r = studio.http.post("/api/tasks", json={"name": name, "config": {"preset": "cpu-demo", **config}})
    assert r.status_code == 201, r.text
    return r.json()


def sse_events(studio, task_id, *, last_event_id=None, after=None, limit=None, timeout=60):
    """Read the stream; return (event name, id, data) tuples until it closes or `limit` events with ids."""
    headers = {"Last-Event-ID": str(last_event_id)} if last_event_id is not None else {}
    headers.update(studio.auth)
    params = {"after": after} if after is not None else {}
    out = []
    with httpx.stream(
        "GET", f"{studio.url}/api/tasks/{task_id}/stream", headers=headers, params=params, timeout=timeout
    ) as r:
        assert r.status_code == 200
        event, eid, data = "message", None, ""
        for line in r.iter_lines():
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("id: "):
                eid = int(line[4:])
            elif line.startswith("data: "):
                data = line[6:]
            elif line == "" and data:
                out.append((event, eid, json.loads(data)))
                event, eid, data = "message", None, ""
                if limit and sum(1 for e in out if e[1] is not None) >= limit:
                    break
    return out


def test_health_openapi_and_the_page(client):
    h = client.get("/api/health").json()
    assert h["status"] == "ok" and h["home"] == str(client.service.home.root)
    paths = client.get("/openapi.json").json()["paths"]
    for route in ("/api/tasks", "/api/tasks/{task_id}", "/api/tasks/{task_id}/cancel", "/api/tasks/{task_id}/logs",
                  "/api/tasks/{task_id}/metrics", "/api/tasks/{task_id}/stream", "/api/datasets", "/api/health",
                  "/api/statuses"):  # fmt: skip
        assert route in paths
    assert client.get("/").status_code == 200
    # The lifecycle's table, the one the page's lifecycle.js is generated from.
    assert client.get("/api/statuses").json() == lifecycle.describe()


def test_a_task_runs_and_every_view_agrees(studio):
    task = create(studio, "scripted steps=12 delay=0.02")
    for key in ("id", "status", "pid", "step", "total_steps", "epoch", "loss", "error", "reattached", "actions"):
        assert key in task
    done = studio.wait_status(task["id"], "completed")
    assert done["step"] == 12 and done["percent"] == 100.0 and done["actions"] == ["extend", "delete"]
    metrics = studio.http.get(f"/api/tasks/{task['id']}/metrics").json()["events"]
    assert [e["step"] for e in metrics if e["kind"] == "progress"] == list(range(1, 13))
    logs = studio.http.get(f"/api/tasks/{task['id']}/logs").json()
    assert "step 12/12" in logs["text"] and logs["next_offset"] == logs["size"]
    tail = studio.http.get(f"/api/tasks/{task['id']}/logs", params={"offset": logs["size"]}).json()
    assert tail["text"] == ""
    listing = studio.http.get("/api/tasks", params={"limit": 1}).json()
    assert listing["total"] == 1 and listing["tasks"][0]["id"] == task["id"]


def test_held_out_answers_are_served_stage_by_stage_oldest_first(client):
    task = posted(client, "answers held-out prompts")
    runner = client.service.executor.runner(task["id"])
    for step, stage in ((1, "checkpoint-1"), (3, "final")):  # as the trainer writes them (evaluation.py)
        answers = [
            {"prompt": f"prompt {i}", "reference": None if i % 2 else f"expected {i}",
             "adapter": f"<b>tuned {i} at {step}</b>", "base": f"base {i}"}
            for i in range(2)
        ]  # fmt: skip
        write_stage(runner.task.path, stage, step, 16, answers, 0.01, runner)
    runner.complete(steps=3)
    assert synced(client, task["id"])["status"] == "completed"
    stages = client.get(f"/api/tasks/{task['id']}/samples").json()["stages"]
    assert [(s["stage"], s["step"]) for s in stages] == [("checkpoint-1", 1), ("final", 3)]
    assert stages[-1]["samples"] == [
        {"prompt": "prompt 0", "reference": "expected 0", "adapter": "<b>tuned 0 at 3</b>", "base": "base 0"},
        {"prompt": "prompt 1", "reference": None, "adapter": "<b>tuned 1 at 3</b>", "base": "base 1"},
    ]
    events = client.get(f"/api/tasks/{task['id']}/metrics").json()["events"]
    assert [(e["stage"], e["count"]) for e in events if e["kind"] == "samples"] == [("checkpoint-1", 2), ("final", 2)]
    # A task that answered none has no stages; an unknown one is not found.
    other = posted(client, "answers none")
    assert client.get(f"/api/tasks/{other['id']}/samples").json() == {"stages": []}
    assert client.get("/api/tasks/20990101-0000-ffffff/samples").status_code == 404


def test_the_stream_resumes_from_the_last_event_id_without_loss_or_duplicates(studio):
    task = create(studio, "scripted steps=40 delay=0.05")
    first = sse_events(studio, task["id"], limit=10)
    assert first[0][0] == "studio" and first[1][0] == "task"
    ids = [e[1] for e in first if e[1] is not None]
    assert ids == list(range(1, 11))
    rest = sse_events(studio, task["id"], last_event_id=ids[-1])  # as EventSource does on reconnect
    rest_ids = [e[1] for e in rest if e[1] is not None]
    assert rest_ids[0] == 11 and rest_ids == list(range(11, rest_ids[-1] + 1))
    assert rest[-1][0] == "task" and rest[-1][2]["status"] == "completed"  # the stream ends with the final state
    assert sse_events(studio, task["id"], after=rest_ids[-1])[-1][2]["status"] == "completed"


def test_cancel_over_http_leaves_no_process(studio):
    task = create(studio, "scripted steps=1000 delay=0.05 child=1")
    wait_for(lambda: len(tagged(task["id"])) >= 3, what="processes")
    t0 = time.monotonic()
    r = studio.http.post(f"/api/tasks/{task['id']}/cancel")
    # The answer comes at once (no worker waits out the grace period); the task says it is stopping.
    assert r.status_code == 200 and time.monotonic() - t0 < 2.0
    assert r.json()["status"] == "cancelled" or r.json()["phase"] == "cancelling", r.json()
    assert studio.wait_status(task["id"], "cancelled", timeout=30)["error"] is None
    # The runner's exit marks it cancelled; the grandchild in its own session may take the SIGKILL a moment later.
    wait_for(lambda: tagged(task["id"]) == [], timeout=10, what="no process of the task left")
    assert studio.http.post(f"/api/tasks/{task['id']}/cancel").status_code == 409


def test_cancel_of_a_trainer_ignoring_sigterm_returns_at_once_and_ends_it(studio):
    task = create(studio, "scripted steps=100000 delay=0.05 hang=1 child=1")
    wait_for(lambda: len(tagged(task["id"])) >= 3, what="runner, trainer and grandchild")
    studio.wait_status(task["id"], "training")
    t0 = time.monotonic()
    r = studio.http.post(f"/api/tasks/{task['id']}/cancel")
    assert r.status_code == 200 and time.monotonic() - t0 < 2.0, r.text
    view = r.json()
    assert view["status"] == "training" and view["phase"] == "cancelling"
    again = studio.http.post(f"/api/tasks/{task['id']}/cancel")  # asked twice while stopping: no second stop
    assert again.status_code == 200
    assert studio.wait_status(task["id"], "cancelled", timeout=40)["status"] == "cancelled"
    assert tagged(task["id"]) == []


def test_delete_refused_while_running(client):
    task = posted(client, "runs long")
    r = client.delete(f"/api/tasks/{task['id']}")
    assert r.status_code == 409 and "cancel it before deleting" in r.json()["detail"]
    client.post(f"/api/tasks/{task['id']}/cancel")
    wait_for(lambda: synced(client, task["id"])["status"] == "cancelled", timeout=30, what="cancelled")
    assert client.delete(f"/api/tasks/{task['id']}").status_code == 204
    assert client.get(f"/api/tasks/{task['id']}").status_code == 404
    assert not (client.service.home.tasks / task["id"]).exists()


@pytest.mark.parametrize(
    ("path", "status"),
    [
        ("/api/tasks/20990101-0000-ffffff", 404),
        ("/api/tasks/..%2F..%2Fetc", 404),
        ("/api/tasks/..", 404),
        ("/api/tasks/x/logs", 404),
        ("/api/tasks/20990101-0000-ffffff/handover", 404),
        ("/api/tasks?limit=0", 422),
        ("/api/tasks?status=bogus", 422),
    ],
)
def test_bad_reads_get_clear_errors(client, path, status):
    r = client.get(path)
    assert r.status_code == status
    if r.headers.get("content-type", "").startswith("application/json"):
        detail = r.json()["detail"]
        assert isinstance(detail, str) and "\n" not in detail


def test_how_to_use_a_result_is_only_for_a_completed_task(client):
    task = posted(client, "runs long")
    r = client.get(f"/api/tasks/{task['id']}/handover")
    assert r.status_code == 404
    assert r.json()["detail"] == f"task {task['id']} has no adapter yet; it is written when training completes"
    client.service.executor.runner(task["id"]).complete(steps=2)
    assert synced(client, task["id"])["status"] == "completed"
    assert client.get(f"/api/tasks/{task['id']}/handover").status_code == 200


def test_a_second_server_on_the_same_home_refuses(studio, studio_factory):
    other = studio_factory(scripted=True)
    with pytest.raises(AssertionError, match="studio exited with 3"):
        other.start()
    out = (studio.home.parent / "studio-stdout.log").read_text()
    assert "error: another studio is already running on" in out and f"pid {studio.proc.pid}" in out
    assert studio.http.get("/api/health").status_code == 200  # the first one is untouched


def test_runners_inherit_no_descriptor_of_the_studio(studio):
    """A runner holding the studio's listening socket or lock would keep the port busy and
    the lock taken after the studio dies, and the next studio could not start."""
    task = create(studio, "scripted steps=1000 delay=0.05")
    wait_for(lambda: len(tagged(task["id"])) >= 2, what="processes")
    studio_files = {
        str(studio.home / n) for n in ("studio.db", "studio.db-wal", "studio.db-shm", "studio.lock", "studio.log")
    }
    for proc in tagged(task["id"]):
        assert proc.net_connections(kind="all") == []
        assert not studio_files & {f.path for f in proc.open_files()}
    studio.http.post(f"/api/tasks/{task['id']}/cancel")


def test_the_listening_socket_says_tcp_so_responses_are_not_held_back():
    # asyncio sets TCP_NODELAY on accepted connections only when the listening socket's protocol
    # is IPPROTO_TCP; with protocol 0 every request on a kept-alive connection waited ~40 ms for
    # a delayed ACK (bench/bench_startup.py measured /api/health at 44 ms).
    import socket

    from ftstudio.web.daemon import _bind_one

    sock = _bind_one("127.0.0.1", 0)
    try:
        assert sock.proto == socket.IPPROTO_TCP
    finally:
        sock.close()
