"""Reading one dataset file row by row, in bounded memory, and the preview a person sees.

The studio checks uploads and submitted datasets while it serves other requests,
so nothing here holds a whole file: JSON lines and CSV are read a line at a time
(a line is read no further than the row limit), a JSON list is cut into its items
as it streams, parquet is read a batch at a time. Files that cannot be read that
way (one big JSON object, parquet row groups of hundreds of MB) are refused with
a message saying how to save them instead, when a row limit is set (the studio);
the trainer reads what it is given.

Messages name a file, a line or a row and what is wrong, never what is in it:
an error must not become a way to read a file through the API.
"""

from __future__ import annotations

import csv
import json
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from ftstudio.errors import Problem, ValidationError

FIELD = "data.path (--dataset)"
DATASET_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet", ".txt")
"""The files read as datasets (.txt: raw text, a paragraph per row, for continued pre-training)."""
BOM = b"\xef\xbb\xbf"
# A .json file that is one object (`{"rows": [...]}`) is parsed whole; in the studio only up to this size.
MAX_WHOLE_JSON_BYTES = 8 << 20
# A parquet row group is decoded whole; in the studio only up to this (uncompressed) size.
MAX_ROW_GROUP_BYTES = 256 << 20
# A JSON list's item is looked for in a window this large when no row limit is set (the trainer).
UNBOUNDED_ROW_BYTES = 256 << 20
CHUNK = 1 << 20

PREVIEW_VALUE_CHARS = 4096
PREVIEW_TOTAL_CHARS = 16384
PREVIEW_ITEMS = 20
PREVIEW_COLUMNS = 50
PREVIEW_KEY_CHARS = 200
PREVIEW_DEPTH = 8
UNREADABLE = "holds a number with too many digits or nesting too deep to read; fix it"


KINDS = {
    stat.S_IFIFO: "a named pipe (FIFO)",
    stat.S_IFSOCK: "a socket",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFDIR: "a folder",
}


def not_regular(path: Path, mode: int) -> ValidationError:
    kind = KINDS.get(stat.S_IFMT(mode), "not a regular file")
    return _bad(
        path, "", f"is {kind}, not a dataset file; give the path of a .jsonl, .json, .csv, .parquet or .txt file"
    )


def open_regular(path: Path, mode: str = "rb", **text: Any) -> IO[Any]:
    """Open a dataset file for reading, refusing anything but a regular file without ever waiting on it: a
    named pipe would block a plain open() until someone writes to it (a worker thread of the studio, held
    forever), and a device or socket is not a dataset. Opened non-blocking and checked on the open file
    itself, so a path swapped for a pipe after a check cannot block either."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise _bad(path, "", f"cannot be opened ({e.strerror}); check the path and its permissions") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise not_regular(path, st.st_mode)
        os.set_blocking(fd, True)
        return open(fd, mode, closefd=True, **text)  # the caller's `with` closes it
    except BaseException:
        os.close(fd)
        raise


def read_jsonl(path: Path, max_row_bytes: int | None) -> Iterator[tuple[str, dict[str, Any]]]:
    with open_regular(path) as f:
        for n, text in _lines(f, path, max_row_bytes):
            if not text.strip():
                continue
            try:
                row = json.loads(text)
            except json.JSONDecodeError as e:
                raise _bad(path, f"line {n}", f"not valid JSON ({e.msg} at column {e.colno}); fix that line") from None
            except (ValueError, RecursionError):  # Python's digit limit, or nesting past the recursion limit
                raise _bad(path, f"line {n}", UNREADABLE) from None
            if not isinstance(row, dict):
                raise _bad(path, f"line {n}", f"expected a JSON object, got {type(row).__name__}")
            yield f"line {n}", row


def read_text(path: Path, max_row_bytes: int | None) -> Iterator[tuple[str, dict[str, Any]]]:
    """Plain text for continued pre-training: each paragraph (lines up to a blank one) is a row `{"text": ...}`,
    named by the line it starts on. A paragraph over the row limit is refused like a long row."""
    with open_regular(path) as f:
        start, lines, size = 0, [], 0
        for n, line in _lines(f, path, max_row_bytes):
            if line.strip():
                start = start or n
                lines.append(line)
                size += len(line)
                if max_row_bytes and size > max_row_bytes:
                    raise _too_long(path, f"the paragraph at line {start}", max_row_bytes)
                continue
            if lines:
                yield f"line {start}", {"text": "".join(lines).strip()}
            start, lines, size = 0, [], 0
        if lines:
            yield f"line {start}", {"text": "".join(lines).strip()}


def read_json(path: Path, max_row_bytes: int | None) -> Iterator[tuple[str, dict[str, Any]]]:
    """A list of rows (streamed), an object holding one list of rows, or JSON lines in a .json file."""
    with open_regular(path) as f:
        head = f.read(4096).removeprefix(BOM).lstrip()
    if head.startswith(b"["):
        yield from _json_list(path, max_row_bytes or UNBOUNDED_ROW_BYTES)
        return
    if max_row_bytes is not None and path.stat().st_size > MAX_WHOLE_JSON_BYTES:
        # Too big to parse whole in the studio: fine as JSON lines, one object a line.
        first = head.split(b"\n", 1)[0]
        try:
            is_lines = isinstance(json.loads(first), dict)
        except (ValueError, UnicodeDecodeError, RecursionError):
            is_lines = False
        if not is_lines:
            raise _bad(
                path,
                "",
                f"one JSON object of {_mb(path.stat().st_size)} is too big to check here (the limit is "
                f"{_mb(MAX_WHOLE_JSON_BYTES)}); save it as a list of rows ([...]) or as JSON lines (.jsonl)",
            )
        yield from read_jsonl(path, max_row_bytes)
        return
    try:
        text = path.read_bytes().removeprefix(BOM).decode("utf-8")
    except UnicodeDecodeError:
        raise _bad(path, "", "not UTF-8 text; save the file as UTF-8") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        # Many ".json" datasets are really JSON lines.
        if text.lstrip().startswith("{") and e.msg == "Extra data":
            yield from read_jsonl(path, max_row_bytes)
            return
        raise _bad(path, f"line {e.lineno}", f"not valid JSON ({e.msg} at column {e.colno}); fix the file") from None
    except (ValueError, RecursionError):
        raise _bad(path, "", UNREADABLE) from None
    if isinstance(data, dict):
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise _bad(path, "", "expected a list of rows, or an object holding one list of rows")
        data = lists[0]
    if not isinstance(data, list):
        raise _bad(path, "", "expected a list of rows")
    for n, row in enumerate(data, 1):
        if not isinstance(row, dict):
            raise _bad(path, f"row {n}", f"expected an object, got {type(row).__name__}")
        yield f"row {n}", row


def read_csv(path: Path, max_row_bytes: int | None) -> Iterator[tuple[str, dict[str, Any]]]:
    with open_regular(path) as f:
        reader = csv.DictReader(text for _, text in _lines(f, path, max_row_bytes))
        try:
            for row in reader:
                # line_num counts the header as line 1, as a spreadsheet does
                yield f"line {reader.line_num}", {k: v for k, v in row.items() if k}
        except csv.Error as e:  # its messages describe the syntax, not the content
            raise _bad(path, f"line {reader.line_num}", f"not a valid CSV row ({e}); fix that row") from None


def read_parquet(path: Path, max_row_bytes: int | None) -> Iterator[tuple[str, dict[str, Any]]]:
    import pyarrow.parquet as pq

    with open_regular(path) as source:  # pyarrow reads the checked file, not the path again
        try:
            table = pq.ParquetFile(source)
        except Exception:  # pyarrow raises several types for a damaged file; their text may quote it
            raise _bad(path, "", "not a readable parquet file; re-export it") from None
        if max_row_bytes is not None:
            meta = table.metadata
            biggest = max((meta.row_group(i).total_byte_size for i in range(meta.num_row_groups)), default=0)
            if biggest > MAX_ROW_GROUP_BYTES:
                raise _bad(
                    path,
                    "",
                    f"a row group of {_mb(biggest)} is too big to check here (the limit is {_mb(MAX_ROW_GROUP_BYTES)}); "
                    "write it with smaller row groups (pyarrow: row_group_size=10000)",
                )
        n = 0
        try:
            for batch in table.iter_batches(batch_size=1024):
                for row in batch.to_pylist():
                    n += 1
                    yield f"row {n}", row
        except (OSError, ValueError, ArithmeticError):  # pyarrow's errors derive from these
            raise _bad(path, f"row {n + 1}", "cannot be read (a damaged parquet file); re-export it") from None


def _lines(f: IO[bytes], path: Path, max_row_bytes: int | None) -> Iterator[tuple[int, str]]:
    """(line number, text) for every line, each read no further than `max_row_bytes` past its start."""
    n = 0
    while True:
        line = f.readline(max_row_bytes + 1) if max_row_bytes else f.readline()
        if not line:
            return
        n += 1
        if max_row_bytes and len(line.rstrip(b"\r\n")) > max_row_bytes:
            raise _too_long(path, f"line {n}", max_row_bytes)
        if n == 1:
            line = line.removeprefix(BOM)
        try:
            yield n, line.decode("utf-8")
        except UnicodeDecodeError:
            raise _bad(path, f"line {n}", "not UTF-8 text; save the file as UTF-8") from None


def _json_list(path: Path, limit: int) -> Iterator[tuple[str, dict[str, Any]]]:
    """The items of a JSON list, decoded one at a time from a window of the file."""
    decoder = json.JSONDecoder()
    with open_regular(path, "r", encoding="utf-8-sig", errors="strict") as f:
        buf, pos, eof, n = "", 0, False, 0
        want_item, closed_ok = True, True  # after `[`: an item or `]`; after an item: `,` or `]`

        def more() -> bool:
            nonlocal buf, pos, eof
            if eof:
                return False
            try:
                chunk = f.read(CHUNK)
            except UnicodeDecodeError:
                raise _bad(path, f"row {n + 1}", "not UTF-8 text; save the file as UTF-8") from None
            buf, pos, eof = buf[pos:] + chunk, 0, not chunk
            return bool(chunk)

        started = False
        while True:
            while pos < len(buf) and buf[pos] in " \t\r\n":
                pos += 1
            if pos >= len(buf):
                if more():
                    continue
                raise _bad(path, f"row {n + 1}", "the list ends before its closing ]; fix the file")
            if not started:
                started, pos = True, pos + 1  # the `[` seen by read_json
                continue
            ch = buf[pos]
            if ch == "]" and closed_ok:
                return
            if not want_item:
                if ch != ",":
                    raise _bad(path, f"after row {n}", "expected , or ] between rows; fix the file")
                pos, want_item, closed_ok = pos + 1, True, False
                continue
            try:
                row, end = decoder.raw_decode(buf, pos)
            except json.JSONDecodeError as e:
                if len(buf) - pos > limit:
                    raise _too_long(path, f"row {n + 1}", limit) from None
                if more():
                    continue
                raise _bad(path, f"row {n + 1}", f"not valid JSON ({e.msg}); fix the file") from None
            except (ValueError, RecursionError):
                raise _bad(path, f"row {n + 1}", UNREADABLE) from None
            if end - pos > limit:
                raise _too_long(path, f"row {n + 1}", limit)
            if end == len(buf) and not eof and more():
                continue  # a number or word cut by the window's edge: decode it again whole
            n += 1
            if not isinstance(row, dict):
                raise _bad(path, f"row {n}", f"expected an object, got {type(row).__name__}")
            pos, want_item, closed_ok = end, False, True
            yield f"row {n}", row


def preview(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The first rows as a person sees them on the page: long values cut and marked, the whole bounded."""
    cap = PREVIEW_VALUE_CHARS
    while True:
        out = [_clip(r, cap, 0) for r in rows]
        if cap <= 64 or len(json.dumps(out)) <= PREVIEW_TOTAL_CHARS:
            break
        cap //= 2
    while len(out) > 1 and len(json.dumps(out)) > PREVIEW_TOTAL_CHARS:
        out.pop()
    return out


def _clip(value: Any, cap: int, depth: int) -> Any:
    if isinstance(value, str):
        return value if len(value) <= cap else f"{value[:cap]}… [cut: {len(value)} characters in all]"
    if isinstance(value, bool | int | float) or value is None:
        return value
    if depth >= PREVIEW_DEPTH:
        return "… [cut: nested too deep]"
    if isinstance(value, dict):
        items = list(value.items())
        out = {str(k)[:PREVIEW_KEY_CHARS]: _clip(v, cap, depth + 1) for k, v in items[:PREVIEW_COLUMNS]}
        if len(items) > PREVIEW_COLUMNS:
            out["…"] = f"[cut: {len(items)} columns in all]"
        return out
    if isinstance(value, list | tuple):
        clipped = [_clip(v, cap, depth + 1) for v in value[:PREVIEW_ITEMS]]
        if len(value) > PREVIEW_ITEMS:
            clipped.append(f"… [cut: {len(value)} items in all]")
        return clipped
    return _clip(str(value), cap, depth)  # dates, bytes, decimals from parquet


def _bad(path: Path, where: str, message: str) -> ValidationError:
    at = f"{path.name} {where}" if where else path.name
    return ValidationError(Problem(FIELD, f"{at}: {message}"))


def _too_long(path: Path, where: str, limit: int) -> ValidationError:
    return _bad(
        path,
        where,
        f"longer than {_size(limit)}, the most one row may hold here; shorten or split that row "
        "(the studio's owner can raise it with `ftstudio studio start --max-row-kb N`)",
    )


def _size(n: int) -> str:
    return _mb(n) if n >= 1 << 20 else f"{n >> 10} KB" if n >= 1 << 10 else f"{n} bytes"


def _mb(n: int) -> str:
    return f"{n / (1 << 20):.0f} MB" if n >= 10 << 20 else f"{n / (1 << 20):.1f} MB".replace(".0 MB", " MB")
