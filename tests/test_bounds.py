"""Numbers and shapes no request can push past: each bad request is a one-line 422 naming the
field and its limit, and changes nothing (never a 500, never an OverflowError from SQLite)."""

import pytest
from support import api_client, in_memory

HUGE = 2**70  # past SQLite's 64-bit integers


@pytest.fixture
def client(home):
    # Every task trains 3 steps and completes in the in-memory executor: the routes read what a run leaves.
    service = in_memory(home, on_submit=lambda runner: runner.complete(steps=3), in_server=True)
    with api_client(service) as c:
        r = c.post("/api/tasks", json={"name": "three steps", "config": {"preset": "cpu-demo"}})
        assert r.status_code == 201, r.text
        c.existing = r.json()["id"]
        c.service = service
        # Finished, so a stream of it ends once everything is sent (no supervisor runs in-process).
        service.supervisor.sync(service.store.get(c.existing))
        assert service.store.get(c.existing).status == "completed"
        yield c


def snapshot(client):
    rows = client.service.store._conn().execute("SELECT id, status, name, config FROM tasks ORDER BY id").fetchall()
    return [tuple(r) for r in rows], sorted(p.name for p in client.service.home.tasks.iterdir())


def refused(r, *needles, status=422):
    assert r.status_code == status, r.text
    body = r.json()
    assert isinstance(body["detail"], str) and "\n" not in body["detail"], body
    for needle in needles:
        assert needle in body["detail"], body["detail"]
    assert all(set(p) == {"field", "message"} for p in body.get("problems", [])), body
    return body


def post_raw(client, text):
    return client.post("/api/tasks", content=text.encode(), headers={"content-type": "application/json"})


@pytest.mark.parametrize(
    ("body", "needles"),
    [
        ('{"config": {"optim": {"max_steps": ' + str(HUGE) + '}}}', ["optim.max_steps (--max-steps): must be at most 1,000,000,000 (got 1180591620717411303424)"]),
        ('{"config": {"optim": {"learning_rate": NaN}}}', ["optim.learning_rate (--lr): must be a finite number"]),
        ('{"config": {"optim": {"epochs": Infinity}}}', ["optim.epochs (--epochs): must be a finite number"]),
        ('{"config": {"optim": {"warmup_ratio": -Infinity}}}', ["optim.warmup_ratio: must be a finite number"]),
        ('{"config": {"optim": {"weight_decay": 1e999}}}', ["optim.weight_decay: must be a finite number"]),
        ('{"config": {"optim": {"seed": ' + str(2**64) + '}}}', ["optim.seed: must be at most 4,294,967,295"]),
        ('{"config": {"lora": {"rank": 100000}}}', ["lora.rank (--lora-rank): must be at most 4,096"]),
        ('{"config": {"data": {"max_length": 4}}}', ["data.max_length: must be at least 8 tokens"]),
        ('{"config": {"model": {"name": "' + "m" * 5000 + '"}}}', ["model.name (--model): is 5,000 characters long"]),
        ('{"config": {"preset": {"name": "cpu-demo"}}}', ["preset (--preset): must be the name of a preset"]),
        ('{"model": "x", "dataset": "y"}', ['model: not a field of the request; settings go inside config, e.g. {"config": {"model": {"name": ...}}} (config.model.name)', "dataset: not a field", "(config.data.path)"]),
        ('{"lr": 0.1, "epochs": 2, "preset": "cpu-demo"}', ["(config.optim.learning_rate)", "(config.optim.epochs)", "(config.preset)"]),
        ('{"optim": {"epochs": 1}}', ['{"config": {"optim": {...}}} (config.optim)']),
        ('{"colour": "blue"}', ["colour: not a field of the request, which has only name and config"]),
        ('{"name": {"x": 1}}', ["name: must be text"]),
        ('{"name": "' + "n" * 1001 + '"}', ["name: must be at most 1,000 characters long"]),
        ('{"config": ["preset"]}', ["config: must be a JSON object of settings"]),
        ('"just a string"', ["the request body must be a JSON object"]),
    ],
)  # fmt: skip
def test_bad_task_requests_are_one_line_422_and_change_nothing(client, body, needles):
    before = snapshot(client)
    refused(post_raw(client, body), *needles)
    assert snapshot(client) == before


def test_the_request_body_shape_is_in_the_openapi_schema(client):
    schema = client.get("/openapi.json").json()["components"]["schemas"]["TaskCreate"]
    assert schema["additionalProperties"] is False and schema["properties"]["name"]["anyOf"][0]["maxLength"] == 1000


@pytest.mark.parametrize(
    ("path", "needle"),
    [
        (f"/api/tasks?limit={HUGE}", "limit: must be at most 1,000"),
        ("/api/tasks?limit=0", "limit: must be at least 1"),
        (f"/api/tasks?offset={HUGE}", "offset: must be at most 1,000,000,000"),
        ("/api/tasks?offset=-1", "offset: must be at least 0"),
        ("/api/tasks?limit=ten", "limit: must be a whole number"),
        ("/api/tasks?status=" + "s" * 100, "status: must be at most 64 characters long"),
        ("/api/tasks/{id}/logs?offset=" + str(HUGE), "offset: must be at most 4,611,686,018,427,387,904"),
        ("/api/tasks/{id}/logs?offset=-" + str(HUGE), "offset: must be at least -4,611,686,018,427,387,904"),
        ("/api/tasks/{id}/logs?limit=" + str(HUGE), "limit: must be at most"),
        ("/api/tasks/{id}/logs?limit=0", "limit: must be at least 1"),
        ("/api/tasks/{id}/metrics?after=" + str(HUGE), "after: must be at most"),
        ("/api/tasks/{id}/metrics?after=-1", "after: must be at least 0"),
        ("/api/tasks/{id}/stream?after=" + str(HUGE), "after: must be at most"),
        ("/api/tasks/{id}/stream?after=1" + "0" * 5000, "after: must be a whole number of at most 64 digits"),
        # Zeros are 0, in range: refused by their length, as docs/security.md says.
        (
            "/api/tasks?offset=" + "0" * 5000,
            "offset: must be a whole number of at most 64 digits (got 5,000 characters)",
        ),
        ("/api/tasks?limit=" + "0" * 4999 + "1", "limit: must be a whole number of at most 64 digits"),
        ("/api/tasks/{id}/logs?offset=-" + "0" * 5000, "offset: must be a whole number of at most 64 digits"),
        ("/api/tasks/{id}/metrics?after=" + "0" * 65, "after: must be a whole number of at most 64 digits"),
    ],
)
def test_every_integer_query_parameter_is_bounded(client, path, needle):
    refused(client.get(path.replace("{id}", client.existing)), needle)


def test_query_bounds_show_in_openapi(client):
    paths = client.get("/openapi.json").json()["paths"]
    params = {p["name"]: p["schema"] for p in paths["/api/tasks"]["get"]["parameters"]}
    assert (params["limit"]["minimum"], params["limit"]["maximum"]) == (1, 1000)
    logs = {p["name"]: p["schema"] for p in paths["/api/tasks/{task_id}/logs"]["get"]["parameters"]}
    assert logs["offset"]["minimum"] == -(2**62) and logs["offset"]["maximum"] == 2**62


def test_the_last_bytes_of_a_log_and_the_edges_still_work(client):
    t = client.existing
    size = client.get(f"/api/tasks/{t}/logs").json()["size"]
    assert client.get(f"/api/tasks/{t}/logs?offset=-{2**62}").json()["offset"] == 0
    assert client.get(f"/api/tasks/{t}/logs?offset={2**62}").json()["offset"] == size
    assert client.get(f"/api/tasks/{t}/metrics?after={2**62}").json() == {"events": []}
    assert client.get(f"/api/tasks?offset={10**9}").json()["tasks"] == []


@pytest.mark.parametrize("header", ["١٢".encode(), "²".encode("latin-1"), b"-1", b"abc", b"9" * 30, b"", b" 3", b"3.0"])
def test_a_last_event_id_that_is_not_ours_is_ignored(client, header):
    r = client.get(f"/api/tasks/{client.existing}/stream", headers={"Last-Event-ID": header})
    assert r.status_code == 200
    ids = [int(line[4:]) for line in r.text.splitlines() if line.startswith("id: ")]
    assert ids and ids[0] == 1  # replayed from the start, as if no header came


def test_a_last_event_id_of_ours_resumes_after_it(client):
    r = client.get(f"/api/tasks/{client.existing}/stream", headers={"Last-Event-ID": "2"})
    ids = [int(line[4:]) for line in r.text.splitlines() if line.startswith("id: ")]
    assert ids and ids[0] == 3
