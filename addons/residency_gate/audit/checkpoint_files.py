"""Publishing signed checkpoint lines beside the log (``checkpoints-{origin}.jsonl``) and to
the anchor file: appended and fsynced after the log itself is, so a checkpoint never covers
records that are not on disk. Retention relies on what was published (``published``)."""

from __future__ import annotations

import os
from pathlib import Path

from ..fileio import fsync_dir
from .canonical import parse
from .segment_file import write_all


class CheckpointFiles:
    def __init__(self, checkpoints_file: Path, anchor_file: Path | None, origin: str) -> None:
        self.checkpoints_file = checkpoints_file
        self.anchor_file = anchor_file
        self.origin = origin
        self.published = 0  # size of the newest checkpoint appended to every checkpoint file
        self._pending: list[bytes] = []
        self._pending_size = 0
        self._needs_newline: dict[Path, bool] = {}

    @property
    def paths(self) -> list[Path]:
        return [self.checkpoints_file] + ([self.anchor_file] if self.anchor_file else [])

    def open(self) -> None:
        """Note which files end in a torn line (a newline goes first)."""
        self._check(self.checkpoints_file)
        if self.anchor_file:
            self.anchor_file.parent.mkdir(parents=True, exist_ok=True)
            self._check(self.anchor_file)

    def found_published(self) -> None:
        """Take ``published`` from the files as found at open."""
        sizes = [last_checkpoint_size(p, self.origin) for p in self.paths]
        self.published = max(self.published, min(sizes))

    def add(self, line: bytes, size: int) -> None:
        """A signed checkpoint line (with newline), published at the next ``publish``."""
        self._pending.append(line)
        self._pending_size = size

    def publish(self) -> None:
        """Append and fsync the pending lines to every file (call after the log's fsync)."""
        if self._pending:
            lines, self._pending = b"".join(self._pending), []
            for path in self.paths:
                self._append(path, lines)
            self.published = max(self.published, self._pending_size)

    def _check(self, path: Path) -> None:
        """Remember whether an external checkpoint file ends in a torn line."""
        try:
            with open(path, "rb") as fh:
                fh.seek(0, os.SEEK_END)
                if fh.tell() == 0:
                    self._needs_newline[path] = False
                    return
                fh.seek(-1, os.SEEK_END)
                self._needs_newline[path] = fh.read(1) != b"\n"
        except FileNotFoundError:
            self._needs_newline[path] = False

    def _append(self, path: Path, data: bytes) -> None:
        created = not path.exists()
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            if self._needs_newline.get(path):
                data = b"\n" + data
            write_all(fd, data)
            os.fsync(fd)
            self._needs_newline[path] = False
        finally:
            os.close(fd)
        if created:
            fsync_dir(path.parent)


def last_checkpoint_size(path: Path, origin: str, limit: int = 1 << 20) -> int:
    """``size`` of the last complete checkpoint line of ``origin`` in ``path`` (0: none),
    reading at most ``limit`` bytes from the end."""
    try:
        with open(path, "rb") as fh:
            end = fh.seek(0, os.SEEK_END)
            fh.seek(max(0, end - limit))
            data = fh.read()
    except FileNotFoundError:
        return 0
    for line in reversed(data.split(b"\n")):
        try:
            obj = parse(line)
        except ValueError:
            continue
        if isinstance(obj, dict) and obj.get("origin") == origin \
                and type(obj.get("size")) is int:
            return obj["size"]
    return 0
