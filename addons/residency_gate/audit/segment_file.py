"""The log segment being written: records buffered until the group commit writes and fsyncs
them, its size and age (for rotation), and creating a segment durably."""

from __future__ import annotations

import os
import time
from pathlib import Path

from ..fileio import fsync_dir
from .canonical import parse
from .chain import parse_ts


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        if n <= 0:
            raise OSError("short write")
        view = view[n:]


class SegmentFile:
    def __init__(self) -> None:
        self.fd: int | None = None
        self.path: Path | None = None
        self.bytes = 0        # the file's size, buffered lines included
        self.records = 0      # records in it (0: rotation is never due)
        self.started = time.time()  # when its first record was written
        self.buf: list[bytes] = []

    def open(self, path: Path, create: bool) -> None:
        """Open ``path`` for appending (``create``: it must not exist yet); a new file and
        its directory entry are fsynced at once."""
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT
        if create:
            flags |= os.O_EXCL
        existed = path.exists()
        self.fd = os.open(path, flags, 0o640)
        self.path = path
        self.bytes = os.fstat(self.fd).st_size
        if not existed:
            os.fsync(self.fd)
            fsync_dir(path.parent)

    def start(self, path: Path) -> None:
        """Create ``path`` as the next segment of the rotation series."""
        self.open(path, create=True)
        self.records = 0
        self.started = time.time()

    def count_existing(self) -> None:
        """Records and age of the segment as found at open (time-based rotation counts from
        its first record)."""
        self.records = 0
        self.started = time.time()
        assert self.path is not None
        data = self.path.read_bytes() if self.path.exists() else b""
        first_line = data.split(b"\n", 1)[0]
        if first_line:
            self.records = max(1, data.count(b"\n"))
            try:
                ts = parse(first_line).get("ts")
                self.started = parse_ts(ts).timestamp()
            except (ValueError, AttributeError, TypeError):
                pass

    def add(self, line: bytes) -> None:
        """Buffer one record's line (with its newline) for the next write."""
        self.buf.append(line)
        self.bytes += len(line)
        self.records += 1

    def write_now(self, data: bytes) -> None:
        """Write ``data`` at once, unbuffered (recovery's newlines)."""
        assert self.fd is not None
        write_all(self.fd, data)
        self.bytes += len(data)

    def rotation_due(self, max_bytes: int, max_seconds: float) -> bool:
        if self.records == 0:
            return False
        return self.bytes >= max_bytes or time.time() - self.started >= max_seconds

    def flush(self) -> None:
        if self.buf:
            if self.fd is None:
                raise OSError("audit segment is not open")
            data = b"".join(self.buf)
            self.buf.clear()
            write_all(self.fd, data)

    def sync(self) -> bool:
        """Write what is buffered and fsync it; False when there was nothing to write."""
        if not self.buf:
            return False
        self.flush()
        assert self.fd is not None
        os.fsync(self.fd)
        return True

    def close(self) -> None:
        if self.fd is not None:
            fd, self.fd = self.fd, None
            try:
                os.close(fd)
            except OSError:
                pass
