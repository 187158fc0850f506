import json
import math

from ftstudio.events import EventWriter, read_from


def test_reader_takes_complete_lines_only(tmp_path):
    path = tmp_path / "events.jsonl"
    with EventWriter(path) as w:
        w.emit("progress", step=1, loss=1.0)
    with open(path, "a") as f:
        f.write('{"kind": "progress", "step": 2')  # being written right now
    chunk = read_from(path, 0)
    assert [e["step"] for e in chunk.events] == [1]
    with open(path, "a") as f:
        f.write("}\nnot json\n")
    chunk2 = read_from(path, chunk.offset)
    assert [e["step"] for e in chunk2.events] == [2]
    assert chunk2.bad_lines == 1
    assert chunk2.offset == path.stat().st_size
    assert read_from(path, chunk2.offset).events == []


def test_missing_file_is_no_events(tmp_path):
    chunk = read_from(tmp_path / "nope.jsonl", 0)
    assert (chunk.events, chunk.offset) == ([], 0)


def test_non_finite_numbers_become_null(tmp_path):
    path = tmp_path / "e.jsonl"
    with EventWriter(path) as w:
        w.emit("progress", step=3, loss=math.nan, grad_norm=math.inf)
    ev = json.loads(path.read_text())
    assert ev["loss"] is None and ev["grad_norm"] is None and ev["kind"] == "progress" and ev["ts"] > 0


def test_numbers_json_cannot_carry_are_bad_lines_and_lines_are_numbered(tmp_path):
    path = tmp_path / "e.jsonl"
    path.write_text(
        '{"kind": "progress", "step": 1}\n'
        '{"kind": "progress", "loss": NaN}\n'
        "\n"
        '{"kind": "progress", "loss": -Infinity}\n'
        '{"kind": "progress", "loss": 1e999}\n'
        '{"kind": "status", "message": "loss is NaN, e999 in text is fine"}\n'
        '{"kind": "progress", "step": 2, "note": "a\u2028b"}\r\n'
    )
    chunk = read_from(path, 0)
    assert [e.get("step") for e in chunk.events] == [1, None, 2]
    assert chunk.bad_lines == 3
    assert chunk.line_numbers == [1, 6, 7]  # the U+2028 inside a string breaks no line
    assert chunk.events[2]["note"] == "a\u2028b"
