"""Uploads are bounded while they stream: the size limit is counted as bytes arrive, a row over the
row limit is named by its line, every dataset shape is read in bounded memory, previews are capped,
and any file name becomes a short safe one that the listing and the lookup agree on. A refused
upload keeps nothing."""

import io
import json
import socket
import tracemalloc

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from support import api_client, in_memory

from ftstudio.errors import ValidationError
from ftstudio.home import Home
from ftstudio.studio.policy import Policy
from ftstudio.studio.service import Service
from ftstudio.training import datafiles
from ftstudio.training.data import inspect_dataset

ROW = json.dumps({"instruction": "say hi", "output": "hi"}).encode() + b"\n"
LIMIT = 64 << 10
ROW_LIMIT = 2 << 10


@pytest.fixture
def client(home):
    # Tasks submitted here "run" in the in-memory executor: what the uploads are is the point, not a run.
    service = in_memory(home, in_server=True, policy=Policy(max_upload_bytes=LIMIT, max_row_bytes=ROW_LIMIT))
    with api_client(service) as c:
        c.service = service
        yield c


def leftovers(client):
    """Everything under datasets/: a refused upload must leave this empty."""
    return sorted(p.name for p in client.service.home.datasets.rglob("*"))


def one_line(r, status, *needles):
    assert r.status_code == status, r.text
    detail = r.json()["detail"]
    assert isinstance(detail, str) and "\n" not in detail and len(detail) < 600, detail
    for needle in needles:
        assert needle in detail, detail
    return detail


def upload(client, name, data, **kw):
    return client.post("/api/datasets", files={"file": (name, io.BytesIO(data), "application/jsonl")}, **kw)


def multipart(name, data, boundary="b0undary"):
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{name}"\r\n'
        "Content-Type: application/jsonl\r\n\r\n"
    ).encode()
    return head + data + f"\r\n--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def test_an_upload_over_the_limit_is_413_and_keeps_nothing(client):
    r = upload(client, "big.jsonl", ROW * (LIMIT // len(ROW) + 10))
    one_line(r, 413, "file: larger than", "--max-upload-mb")
    assert leftovers(client) == []


def test_a_body_without_a_length_is_cut_at_the_limit(client):
    body, ctype = multipart("big.jsonl", ROW * (4 * LIMIT // len(ROW)))
    sent = []

    def chunks():  # no Content-Length: httpx sends it chunked
        for i in range(0, len(body), 4096):
            sent.append(i)
            yield body[i : i + 4096]

    r = client.post("/api/datasets", content=chunks(), headers={"content-type": ctype})
    one_line(r, 413, "larger than")
    assert leftovers(client) == []


def test_a_body_that_declares_too_much_is_refused_before_it_is_read(studio_factory, home):
    studio = studio_factory().start()
    with socket.create_connection(("127.0.0.1", studio.port), timeout=10) as s:
        s.sendall(
            b"POST /api/datasets HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 1000000000000\r\n"
            + f"Authorization: Bearer {studio.token}\r\n".encode()
            + b"Content-Type: multipart/form-data; boundary=x\r\n\r\n"
        )
        answer = b""
        while b"larger than" not in answer and (got := s.recv(65536)):
            answer += got
        answer = answer.decode()
    assert answer.startswith("HTTP/1.1 413"), answer
    assert "larger than 512 MB" in answer
    assert [p.name for p in (home / "datasets").iterdir()] == []


def test_a_row_over_the_row_limit_names_its_line(client):
    long_row = json.dumps({"instruction": "x" * (ROW_LIMIT + 10), "output": "y"}).encode() + b"\n"
    r = upload(client, "rows.jsonl", ROW * 3 + long_row + ROW)
    one_line(r, 422, "file: rows.jsonl line 4", "longer than 2 KB", "--max-row-kb")
    assert leftovers(client) == []


@pytest.mark.parametrize(
    ("sent", "kept"),
    [
        ("DATA.JSONL", "DATA.JSONL"),
        ("../../x.jsonl", "x.jsonl"),
        ("..\\..\\win.jsonl", "win.jsonl"),
        ("données d'été.jsonl", "donnees-d-ete.jsonl"),
        ("a\x01b\x7f\tc.jsonl", "a-b-c.jsonl"),
        ("n" * 300 + ".jsonl", "n" * 94 + ".jsonl"),
    ],
)
def test_any_file_name_becomes_a_short_safe_one_that_listing_and_lookup_agree_on(client, sent, kept):
    body, ctype = multipart(sent, ROW * 3)  # the name as raw bytes (httpx would escape control characters)
    r = client.post("/api/datasets", content=body, headers={"content-type": ctype})
    assert r.status_code == 201, r.text
    assert r.json()["name"] == kept and len(kept) <= 100
    assert kept in [d["name"] for d in client.get("/api/datasets").json()["datasets"]]
    assert client.get(f"/api/datasets/{kept}").json()["rows"] == 3
    r = client.post("/api/tasks", json={"config": {"preset": "cpu-demo", "data": {"path": kept}}})
    assert r.status_code == 201, r.text


def test_a_second_upload_of_the_same_name_in_any_case_gets_its_own(client):
    assert upload(client, "d.jsonl", ROW).json()["name"] == "d.jsonl"
    assert upload(client, "D.JSONL", ROW).json()["name"] == "D-2.JSONL"


@pytest.mark.parametrize("name", ["", ".jsonl", "...", "noext", "data.exe"])
def test_names_that_are_not_datasets_are_refused(client, name):
    one_line(upload(client, name, ROW), 422, "upload .json, .jsonl, .csv, .parquet or .txt")
    assert leftovers(client) == []


def test_bodies_that_are_not_a_form_with_a_file_are_refused(client):
    # The gate refuses a non-form body before the route (415); the route names what the form lacks (422).
    one_line(client.post("/api/datasets", content=ROW, headers={"content-type": "application/json"}), 415, "multipart")
    body, ctype = multipart("d.jsonl", ROW)
    one_line(client.post("/api/datasets", content=body[:-10], headers={"content-type": ctype}), 422, "file:")
    r = client.post("/api/datasets", files={"other": ("d.jsonl", io.BytesIO(ROW))})
    one_line(r, 422, "no `file` field")
    assert leftovers(client) == []


def test_the_schema_still_describes_a_form_with_a_file(client):
    op = client.get("/openapi.json").json()["paths"]["/api/datasets"]["post"]
    schema = op["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert schema["required"] == ["file"] and schema["properties"]["file"]["format"] == "binary"


def test_previews_are_capped_and_cut_values_marked(home):
    service = Service(Home(home), policy=Policy(max_row_bytes=1 << 20))
    rows = [{"instruction": "i" * 100_000, "output": "o", "extra": list(range(500))} for _ in range(20)]
    data = b"".join(json.dumps(r).encode() + b"\n" for r in rows)
    up = service.upload_dataset("wide.jsonl", io.BytesIO(data))
    assert 1 <= len(up["preview"]) <= 5 and len(json.dumps(up["preview"])) <= datafiles.PREVIEW_TOTAL_CHARS
    first = up["preview"][0]
    assert first["instruction"].endswith("[cut: 100000 characters in all]")
    assert first["extra"][-1] == "… [cut: 500 items in all]"


def test_a_large_file_is_checked_in_bounded_memory(tmp_path):
    path = tmp_path / "many.jsonl"
    # Twice the bound below in rows long enough that parsing them (under tracemalloc) stays quick.
    path.write_bytes(json.dumps({"text": "a" * 200}).encode().join([b"", b"\n"]) * 20_000)
    tracemalloc.start()
    try:
        info = inspect_dataset(path, max_row_bytes=1 << 20)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert info.rows == 20_000 and path.stat().st_size > 2 * (2 << 20)
    assert peak < 2 << 20, f"peak {peak} bytes for a {path.stat().st_size}-byte file"


def test_a_json_list_is_read_item_by_item(tmp_path, monkeypatch):
    monkeypatch.setattr(datafiles, "CHUNK", 64)  # items straddle the window's edge
    path = tmp_path / "list.json"
    rows = [{"text": f"row {i} " + "x" * (i % 90), "n": i * 1.5} for i in range(300)]
    path.write_text(json.dumps(rows, indent=1))
    info = inspect_dataset(path, max_row_bytes=1 << 10)
    assert (info.rows, info.format) == (300, "text")
    path.write_text("[" + json.dumps(rows[0]) + ", {broken")
    with pytest.raises(ValidationError, match=r"list.json row 2: not valid JSON"):
        inspect_dataset(path, max_row_bytes=1 << 10)
    path.write_text("[" + json.dumps({"text": "y" * 5000}) + "]")
    with pytest.raises(ValidationError, match=r"list.json row 1: longer than 1 KB"):
        inspect_dataset(path, max_row_bytes=1 << 10)


def test_shapes_too_big_to_check_safely_are_refused_clearly(tmp_path, monkeypatch):
    monkeypatch.setattr(datafiles, "MAX_WHOLE_JSON_BYTES", 1000)
    path = tmp_path / "wrapped.json"
    path.write_text(json.dumps({"rows": [{"text": "t" * 50}] * 100}, indent=1))
    with pytest.raises(ValidationError, match=r"too big to check here .* save it as a list of rows"):
        inspect_dataset(path, max_row_bytes=1 << 20)
    assert inspect_dataset(path).rows == 100  # the trainer (no row limit) still reads it
    lines = tmp_path / "lines.json"
    lines.write_text("".join(json.dumps({"text": "t" * 50}) + "\n" for _ in range(100)))
    assert inspect_dataset(lines, max_row_bytes=1 << 20).rows == 100

    monkeypatch.setattr(datafiles, "MAX_ROW_GROUP_BYTES", 1000)
    table = tmp_path / "t.parquet"
    texts = [f"{i:05d}" * 20 for i in range(1000)]  # all different: no dictionary makes them small
    pq.write_table(pa.table({"text": texts}), table)
    with pytest.raises(ValidationError, match=r"t.parquet: a row group of .* smaller row groups"):
        inspect_dataset(table, max_row_bytes=1 << 20)
    pq.write_table(pa.table({"text": texts}), table, row_group_size=5)
    assert inspect_dataset(table, max_row_bytes=1 << 20).rows == 1000


def test_csv_rows_are_bounded_and_named(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("instruction,output\nhi,there\n" + "a," + "b" * 3000 + "\n")
    with pytest.raises(ValidationError, match=r"d.csv line 3: longer than 2 KB"):
        inspect_dataset(path, max_row_bytes=2 << 10)
    path.write_bytes(b"instruction,output\nhi,there\n\xff\xfe,x\n")
    with pytest.raises(ValidationError, match=r"d.csv line 3: not UTF-8"):
        inspect_dataset(path)


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("digits.jsonl", b'{"text": 1' + b"1" * 5000 + b"}\n"),
        ("deep.json", b"[" * 100_000),
        ("deep.jsonl", b'{"a": ' + b"[" * 100_000 + b"\n"),
    ],
)
def test_numbers_and_nesting_python_cannot_read_are_a_named_422(home, name, content):
    with api_client(Service(Home(home), in_server=True)) as c:  # the default row limit: these rows fit
        one_line(c.post("/api/datasets", files={"file": (name, io.BytesIO(content))}), 422, name, "too many digits")
    assert sorted((home / "datasets").rglob("*")) == []


def test_a_boundary_longer_than_the_rfc_allows_is_a_422(client):
    ctype = "multipart/form-data; boundary=" + "a" * 300
    one_line(client.post("/api/datasets", content=b"--" + b"a" * 300, headers={"content-type": ctype}), 422, "file:")
    assert leftovers(client) == []
