"""A dataset upload, received as it streams.

The body of `POST /api/datasets` is parsed here as it arrives (python-multipart's
streaming parser), and the bytes of its `file` part go straight into a side
directory of the data home (`datasets/.incoming-*`): never into memory, never
into /tmp, and never past the studio's upload limit, which is counted as the
bytes come in (a body that says it is too big is refused before it is read).
The side directory is removed unless the upload is checked and moved in, so a
refused or broken upload leaves nothing behind.
"""

from __future__ import annotations

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

from ftstudio.errors import ValidationError
from ftstudio.studio.incoming import Incoming

# Multipart boundaries and part headers on top of the file's own bytes.
MULTIPART_OVERHEAD = 64 << 10
MAX_PART_HEADER_BYTES = 16 << 10


class MultipartFile:
    """Feeds the `file` part of a multipart/form-data body, as it arrives, into an Incoming."""

    def __init__(self, content_type: str, incoming: Incoming) -> None:
        kind, options = parse_options_header(content_type)
        boundary = options.get(b"boundary")
        # RFC 2046 caps a boundary at 70 characters; python-multipart refuses longer ones with its own error.
        if kind != b"multipart/form-data" or not boundary or len(boundary) > 70:
            raise ValidationError(
                "file: send the dataset as multipart/form-data with a `file` field "
                "(curl -F file=@data.jsonl http://127.0.0.1:8765/api/datasets)"
            )
        self.incoming = incoming
        self.seen_file = False
        self._headers: dict[bytes, bytes] = {}
        self._field = b""
        self._value = b""
        self._header_bytes = 0
        self._in_file = False
        self._parser = MultipartParser(
            boundary,
            {
                "on_part_begin": self._part_begin,
                "on_header_field": self._header_field,
                "on_header_value": self._header_value,
                "on_header_end": self._header_end,
                "on_headers_finished": self._headers_finished,
                "on_part_data": self._part_data,
                "on_part_end": self._part_end,
            },
        )

    def feed(self, chunk: bytes) -> None:
        try:
            self._parser.write(chunk)
        except MultipartParseError:
            raise ValidationError(
                "file: the multipart body is malformed; send it as a form with a `file` field"
            ) from None

    def finish(self) -> None:
        try:
            self._parser.finalize()
        except MultipartParseError:
            raise ValidationError("file: the multipart body ends early; send the whole file") from None
        if not self.seen_file:
            raise ValidationError("file: no `file` field in the form; send the dataset as the field named file")
        if self._in_file:
            raise ValidationError("file: the upload ended before the file did; send it again")
        self.incoming.close()

    # -- parser callbacks ------------------------------------------------------

    def _part_begin(self) -> None:
        self._headers, self._field, self._value, self._header_bytes = {}, b"", b"", 0

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._count(end - start)
        self._field += data[start:end]

    def _header_value(self, data: bytes, start: int, end: int) -> None:
        self._count(end - start)
        self._value += data[start:end]

    def _header_end(self) -> None:
        self._headers[self._field.lower()] = self._value
        self._field, self._value = b"", b""

    def _count(self, n: int) -> None:
        self._header_bytes += n
        if self._header_bytes > MAX_PART_HEADER_BYTES:
            raise ValidationError("file: a form part's headers are too long; send a plain file field")

    def _headers_finished(self) -> None:
        disposition, options = parse_options_header(self._headers.get(b"content-disposition", b"").decode("latin-1"))
        if disposition == b"form-data" and options.get(b"name") == b"file":
            raw = options.get(b"filename", b"")
            self.incoming.open(raw.decode("utf-8", "replace"))
            self.seen_file = self._in_file = True

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self._in_file:
            self.incoming.write(data[start:end])  # bytes of other fields are dropped, never kept

    def _part_end(self) -> None:
        self._in_file = False
