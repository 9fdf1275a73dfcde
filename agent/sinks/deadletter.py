"""The dead-letter store: items a backend will never accept, kept for a person to read.

Append-only NDJSON, one line per item:

    {"time": "2026-12-01T20:37:41.123456789Z", "sink": "es", "reason": "<the answer>",
     "item": "<the item, as a JSON string>"}

`reason` is the backend's answer, cut to 4 KiB. The file is `dead-letters.ndjson` in the
directory; when it would grow past `max_bytes` it is renamed to `dead-letters.ndjson.1`
(replacing the previous one), so the store holds at most about twice `max_bytes`.
The methods block (file I/O): the runner calls them on its I/O thread.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

import orjson

MAX_REASON_BYTES = 4096
DEFAULT_MAX_BYTES = 64 << 20
FILE_NAME = "dead-letters.ndjson"


def dead_letter_dir(configured: str, disk_dir: str, sink: str) -> str | None:
    """`dead_letter_dir` when set, else `<disk_dir>/<sink>/dead`, else None (counted only)."""
    if configured:
        return configured
    if disk_dir:
        return os.path.join(disk_dir, sink, "dead")
    return None


def rfc3339_ns(time_ns: int) -> str:
    seconds, ns = divmod(time_ns, 1_000_000_000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{ns:09d}Z"


def truncate_utf8(text: str, max_bytes: int) -> str:
    data = text.encode("utf-8", "replace")
    if len(data) <= max_bytes:
        return text
    return data[:max_bytes].decode("utf-8", "ignore")  # no half character at the cut


class DeadLetterStore:
    def __init__(
        self,
        directory: str,
        sink: str,
        max_bytes: int = DEFAULT_MAX_BYTES,
        time_ns: Callable[[], int] = time.time_ns,
    ) -> None:
        self.directory = directory
        self.path = os.path.join(directory, FILE_NAME)
        self.sink = sink
        self.max_bytes = max_bytes
        self.time_ns = time_ns

    def write(self, items: list[bytes], reason: str) -> None:
        """Append one line per item (one write for all of them)."""
        if not items:
            return
        data = self._lines(items, reason)
        os.makedirs(self.directory, mode=0o700, exist_ok=True)
        if self._size() + len(data) > self.max_bytes and self._size() > 0:
            os.replace(self.path, self.path + ".1")
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
        finally:
            os.close(fd)

    def _lines(self, items: list[bytes], reason: str) -> bytes:
        head = {
            "time": rfc3339_ns(self.time_ns()),
            "sink": self.sink,
            "reason": truncate_utf8(reason, MAX_REASON_BYTES),
        }
        return b"".join(
            orjson.dumps({**head, "item": item.decode("utf-8", "replace")},
                         option=orjson.OPT_APPEND_NEWLINE)
            for item in items
        )

    def _size(self) -> int:
        try:
            return os.stat(self.path).st_size
        except FileNotFoundError:
            return 0
