"""The root rule: over HTTP, the files a task reads lie under the data home, the user's home
directory or a folder the owner allowed; links are resolved first; /, /proc, /sys and /dev are
never read, not even from the CLI. Messages never quote a file's content, and a task's files are
served without following links."""

import io
import json
import os
import tarfile
from pathlib import Path

import pytest
from support import api_client, in_memory

from ftstudio.config import TrainingConfig
from ftstudio.studio import paths
from ftstudio.studio.policy import Policy

ROW = json.dumps({"instruction": "say hi", "output": "hi"})
SECRET = "hunter2-s3cr3t"


@pytest.fixture
def client(home, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    service = in_memory(home, in_server=True)  # its tasks "run" in memory: which files they may read is the point
    with api_client(service) as c:
        c.service = service
        yield c


def submit(client, **sections):
    return client.post("/api/tasks", json={"name": "reads files", "config": {"preset": "cpu-demo", **sections}})


def refused(r, *needles):
    assert r.status_code == 422, r.text
    detail = r.json()["detail"]
    assert "\n" not in detail and len(detail) < 800, detail
    for needle in needles:
        assert needle in detail, detail
    return detail


def tasks(client):
    return client.service.store._conn().execute("SELECT count(*) FROM tasks").fetchone()[0]


@pytest.mark.parametrize(
    ("sections", "needles"),
    [
        ({"data": {"path": "/etc/passwd"}}, ["data.path (--dataset): /etc/passwd is outside", "--allow-path DIR"]),
        ({"data": {"path": "/etc/../etc/passwd"}}, ["/etc/../etc/passwd is outside the folders this studio may"]),
        (
            {"data": {"path": "/"}},
            ["data.path (--dataset): / is the root of the file system, which ftstudio never reads"],
        ),
        ({"data": {"path": "/proc/1"}}, ["/proc/1 is in the system folder /proc, which ftstudio never reads"]),
        ({"data": {"path": "/proc/self/environ"}}, ["in the system folder"]),
        ({"data": {"path": "/dev/zero"}}, ["in the system folder"]),
        ({"data": {"path": "/sys/kernel"}}, ["in the system folder"]),
        ({"data": {"path": "/tmp/" + "a" * 300 + ".jsonl"}}, ["a name over 255 bytes"]),
        ({"data": {"path": "x\x00.jsonl"}}, ["data.path (--dataset)"]),
        ({"data": {"validation": "/etc/passwd"}}, ["data.validation: /etc/passwd is outside"]),
        ({"model": {"name": "/etc"}}, ["model.name (--model): /etc is outside"]),
        ({"evaluation": {"prompts": "/etc/passwd"}}, ["evaluation.prompts (--eval-prompts): /etc/passwd is outside"]),
        (
            {"model": {"name": "/proc/self"}},
            ["model.name (--model): /proc/self (it leads to /proc/", "is in the system folder /proc"],
        ),
        ({"checkpoint": {"resume_from": "/etc"}}, ["checkpoint.resume_from: /etc is outside"]),
        ({"checkpoint": {"resume_from": "../../../../etc"}}, ["checkpoint.resume_from: give auto"]),
    ],
)
def test_paths_outside_the_roots_are_refused_over_http(client, sections, needles):
    before = tasks(client)
    refused(submit(client, **sections), *needles)
    assert tasks(client) == before


def test_a_link_inside_a_root_that_leads_out_is_refused(client):
    root = client.service.home.root
    (root / "mine").mkdir()
    (root / "mine" / "data.jsonl").symlink_to("/etc/passwd")
    detail = refused(submit(client, data={"path": str(root / "mine" / "data.jsonl")}), "(through a link) is outside")
    assert "/etc" not in detail  # where the link leads is not told
    # A folder given as a dataset or model is refused when a link inside it leads out.
    folder = root / "folder"
    folder.mkdir()
    (folder / "a.jsonl").write_text(ROW + "\n")
    (folder / "b.jsonl").symlink_to("/etc/passwd")
    refused(submit(client, data={"path": str(folder)}), "through the link", "b.jsonl")
    (folder / "b.jsonl").unlink()
    assert submit(client, data={"path": str(folder)}).status_code == 201


def test_the_owner_can_allow_a_folder(home, tmp_path):
    outside = tmp_path / "shared"
    outside.mkdir()
    (outside / "d.jsonl").write_text(ROW + "\n")
    cfg = TrainingConfig.from_dict({"data": {"path": str(outside / "d.jsonl")}})
    problems = paths.config_problems(cfg, home=home, policy=Policy(), trusted=False)
    assert [p.field for p in problems] == ["data.path (--dataset)"]
    assert f"the data home {home.resolve()}" in problems[0].message
    allowed = Policy(allow_paths=(outside.resolve(),))
    assert paths.config_problems(cfg, home=home, policy=allowed, trusted=False) == []
    # The CLI may read any folder but the system ones.
    assert paths.config_problems(cfg, home=home, policy=Policy(), trusted=True) == []
    system = TrainingConfig.from_dict({"data": {"path": "/proc/1/environ"}})
    assert paths.config_problems(system, home=home, policy=allowed, trusted=True)


def test_hub_ids_split_names_and_uploads_are_not_paths(home):
    cfg = TrainingConfig.from_dict({"model": {"name": "Qwen/Qwen2.5-0.5B"}, "data": {"validation": "test"}})
    assert paths.config_problems(cfg, home=home, policy=Policy(), trusted=False) == []


def test_errors_never_quote_a_file(client):
    root = client.service.home.root
    (root / "mine").mkdir()
    creds = root / "mine" / "creds.csv"
    creds.write_text(f"user,password\nadmin,{SECRET}\n")
    detail = refused(submit(client, data={"path": str(creds)}), "cannot tell the data shape from columns")
    assert SECRET not in detail  # the column names may appear: the file passed the root check
    chat = root / "mine" / "chat.jsonl"
    turns = [{"from": SECRET, "value": "x"}, {"from": "gpt", "value": "y"}]
    chat.write_text(json.dumps({"conversations": turns}) + "\n")
    detail = refused(submit(client, data={"path": str(chat)}), "chat.jsonl line 1", "not a role")
    assert SECRET not in detail
    for name, content in [("bad.json", f'{{"{SECRET}": '), ("bad.parquet", SECRET), ("bad.jsonl", f"{SECRET}\n")]:
        (root / "mine" / name).write_text(content)
        assert SECRET not in refused(submit(client, data={"path": str(root / "mine" / name)}))


def test_task_files_and_the_adapter_never_follow_links(client):
    r = submit(client)
    assert r.status_code == 201, r.text
    task_id = r.json()["id"]
    tdir = client.service.home.task(task_id).path
    log = tdir / "training.log"
    log.unlink(missing_ok=True)
    log.symlink_to("/etc/passwd")
    assert client.get(f"/api/tasks/{task_id}/files/training.log").status_code == 404
    assert client.get(f"/api/tasks/{task_id}/logs").json()["text"] == ""
    spec = client.get(f"/api/tasks/{task_id}/files/spec.json")
    assert spec.status_code == 200 and spec.json()["task_id"] == task_id

    adapter = tdir / "adapter"
    adapter.mkdir(exist_ok=True)
    (adapter / "adapter_config.json").write_text('{"r": 8}')
    (adapter / "adapter_model.safetensors").write_bytes(os.urandom(3 << 20))
    (adapter / "leak").symlink_to("/etc/passwd")
    (adapter / "nested").mkdir()
    os.mkfifo(adapter / "pipe")
    assert client.get(f"/api/tasks/{task_id}/files/adapter_config.json").json() == {"r": 8}
    names = [f["name"] for f in client.get(f"/api/tasks/{task_id}/artifacts").json()["files"]]
    assert names == ["adapter_config.json", "adapter_model.safetensors"]
    r = client.get(f"/api/tasks/{task_id}/adapter.tar.gz")
    assert r.status_code == 200 and r.headers["content-type"] == "application/gzip"
    with tarfile.open(fileobj=io.BytesIO(r.content), mode="r:gz") as tar:
        members = tar.getmembers()
        assert [m.name for m in members] == [f"{task_id}-adapter/{n}" for n in names]
        assert all(m.isfile() for m in members)
        weights = tar.extractfile(members[1])
        assert weights is not None
        assert weights.read() == (adapter / "adapter_model.safetensors").read_bytes()
    # The adapter folder itself swapped for a link: nothing is served from it.
    os.rename(adapter, tdir / "real-adapter")
    adapter.symlink_to(tdir / "real-adapter")
    assert client.get(f"/api/tasks/{task_id}/artifacts").json()["files"] == []
    assert client.get(f"/api/tasks/{task_id}/adapter.tar.gz").status_code == 404
    assert client.get(f"/api/tasks/{task_id}/files/adapter_config.json").status_code == 404


def test_the_trainer_preflight_works_without_the_rule(home, tmp_path):
    """The studio decided at submit; the trainer's own preflight reads what it was given."""
    from ftstudio.training import preflight

    data = tmp_path / "d.jsonl"
    data.write_text(ROW + "\n")
    preflight.check(TrainingConfig.from_dict({"data": {"path": str(data)}}), Path(home))


def test_relative_paths_are_made_absolute_at_submit(home, tmp_path, monkeypatch):
    """The root rule checks a path from the studio's directory and the trainer reads it from the task's:
    both must see the same file, so the spec holds the absolute path."""
    here = tmp_path / "work"
    here.mkdir()
    (here / "x.jsonl").write_text('{"instruction": "q", "output": "a"}\n' * 4)
    monkeypatch.chdir(here)
    service = in_memory(home, in_server=True)
    task = service.submit({"preset": "cpu-demo", "data": {"path": "./x.jsonl"}}, "scripted steps=1", trusted=True)
    assert task.config_dict["data"]["path"] == str(here / "x.jsonl")
    spec = json.loads(task.dir.spec.read_text())
    assert spec["config"]["data"]["path"] == str(here / "x.jsonl")
