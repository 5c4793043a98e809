"""Audit segment files: plain or compressed, found, opened and read one line at a time.

A segment is ``{origin}-{first_seq:012d}.jsonl``; once rotated the writer may replace it
with ``.jsonl.zst`` (zstd, the default) or ``.jsonl.gz``, byte for byte the same content.
Every reader (verify, show, report, replay, inventory) goes through :func:`open_segment`
and :func:`iter_lines`, so plain and compressed segments read alike, and memory stays at
one chunk whatever the file size.

Compression (:func:`compress_segment`) never leaves a segment half-compressed without its
original: the compressed copy is written under a temporary name, fsynced, read back and
compared, renamed into place (directory fsynced), and only then is the original removed.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import zstandard

from ..fileio import fsync_dir
from .canonical import loads_record
from .chain import (
    CHECKPOINTS_PREFIX,
    COMPRESSED_SUFFIXES,
    logical_name,
    parse_segment_name,
    record_error,
)

CHUNK = 1 << 20
ZCHUNK = 1 << 17  # compressed bytes per read: ~1 MB of records once decompressed
TMP_SUFFIX = ".tmp"
FORMATS = {"zstd": ".zst", "gzip": ".gz"}


class SegmentReadError(OSError):
    """A compressed segment cannot be decompressed (truncated or corrupt)."""


# ------------------------------------------------------------------------------ sources


@dataclass(frozen=True)
class Source:
    """One file to read: a path, or in-memory bytes under a name (tests, verify_bytes)."""

    name: str
    path: Path | None = None
    data: bytes | None = None

    @property
    def logical(self) -> str:
        """The segment's name without a compression suffix (what torn_tail records name)."""
        return logical_name(Path(self.name).name)

    def open(self) -> BinaryIO:
        if self.data is not None:
            return _decompressing(io.BytesIO(self.data), self.name)
        assert self.path is not None
        return open_segment(self.path)

    @classmethod
    def of(cls, path: Path) -> Source:
        return cls(str(path), path=Path(path))


class _ZstdReader(io.RawIOBase):
    """zstd frames one after another, read in chunks; a file that ends inside a frame
    (truncated) raises SegmentReadError instead of reading as shorter."""

    def __init__(self, raw: BinaryIO) -> None:
        self.raw = raw
        self.dobj = zstandard.ZstdDecompressor().decompressobj()
        self.buf = b""
        self.off = 0
        self.in_frame = False
        self.done = False

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        while not self.done and (n < 0 or len(self.buf) - self.off < n):
            chunk = self.raw.read(ZCHUNK)
            if not chunk:
                self.done = True
                if self.in_frame:
                    raise SegmentReadError("compressed data ends in the middle of a frame "
                                           "(truncated)")
                break
            out = [self.buf[self.off:]]
            while chunk:
                self.in_frame = True
                out.append(self.dobj.decompress(chunk))
                if not self.dobj.eof:
                    break
                chunk = self.dobj.unused_data
                self.dobj = zstandard.ZstdDecompressor().decompressobj()
                self.in_frame = False
            self.buf, self.off = b"".join(out), 0
        end = len(self.buf) if n < 0 else self.off + n
        data = self.buf[self.off:end]
        self.off = min(end, len(self.buf))
        return data

    def close(self) -> None:
        self.raw.close()
        super().close()


def _decompressing(raw: BinaryIO, name: str) -> BinaryIO:
    name = name.removesuffix(TMP_SUFFIX)  # a copy being written is read as what it becomes
    if name.endswith(".zst"):
        return _ZstdReader(raw)  # type: ignore[return-value]
    if name.endswith(".gz"):
        return gzip.GzipFile(fileobj=raw, mode="rb")  # type: ignore[return-value]
    return raw


def open_segment(path: Path) -> BinaryIO:
    """A binary reader of the segment's content, decompressing by suffix."""
    return _decompressing(open(path, "rb"), str(path))


def read_segment(path: Path) -> bytes:
    """The whole content (the writer's recovery reads its newest segments whole)."""
    with open_segment(path) as fh:
        return _read_all(fh, str(path))


def _read_all(fh: BinaryIO, name: str) -> bytes:
    try:
        return fh.read()
    except (zstandard.ZstdError, EOFError, gzip.BadGzipFile, zlib.error) as exc:
        raise SegmentReadError(f"{name}: cannot decompress: {exc}") from exc


def iter_lines(src: Source) -> Iterator[tuple[int, int, bytes, bool]]:
    """(line number, offset, line without its newline, terminated) for each line.

    Raises SegmentReadError (after the lines read so far) if decompression fails."""
    lineno = 1
    offset = 0
    carry = b""
    with src.open() as fh:
        while True:
            try:
                chunk = fh.read(CHUNK)
            except (zstandard.ZstdError, EOFError, gzip.BadGzipFile, zlib.error) as exc:
                raise SegmentReadError(f"cannot decompress after {offset + len(carry)} "
                                       f"bytes: {exc}") from exc
            if not chunk:
                break
            parts = (carry + chunk).split(b"\n") if carry else chunk.split(b"\n")
            carry = parts.pop()
            for raw in parts:
                yield lineno, offset, raw, True
                offset += len(raw) + 1
                lineno += 1
    if carry:
        yield lineno, offset, carry, False


def first_record_fields(src: Source, limit: int = 64) -> tuple[str | None, int | None]:
    """(origin, seq) from the first lines that carry them: how a file is grouped and ordered
    before it is read in full. Looks at ``limit`` lines at most."""
    origin: str | None = None
    seq: int | None = None
    try:
        for n, (_no, _off, raw, _term) in enumerate(iter_lines(src)):
            if n >= limit:
                break
            try:
                obj = loads_record(raw)
            except ValueError:
                continue
            if not isinstance(obj, dict):
                continue
            if origin is None and isinstance(obj.get("origin"), str):
                origin = obj["origin"]
            s = obj.get("seq")
            if seq is None and isinstance(s, int) and not isinstance(s, bool):
                seq = s
            if origin is not None and seq is not None:
                break
    except OSError:
        pass
    return origin, seq


def is_empty(src: Source) -> bool:
    if src.data is not None:
        return not src.data
    assert src.path is not None
    if not src.path.name.endswith(COMPRESSED_SUFFIXES):
        return src.path.stat().st_size == 0
    try:
        with src.open() as fh:
            return not fh.read(1)
    except (OSError, zstandard.ZstdError, EOFError, zlib.error):
        return False  # unreadable is not empty: the verifier reports it


# ------------------------------------------------------------------------------ finding files


def collect_files(paths: Iterable[Path]) -> tuple[list[Path], list[Path]]:
    """(log files, checkpoint files), plain and compressed. Raises FileNotFoundError for a
    missing path. In a directory, a segment present both plain and compressed (a crash
    between the rename and the removal of the original) is listed once, plain."""
    logs: list[Path] = []
    cps: list[Path] = []
    for p in paths:
        p = Path(p)
        if p.is_dir():
            found = sorted(f for f in p.iterdir() if f.is_file() and _is_log_name(f.name))
            names = {f.name for f in found}
            for f in found:
                if f.name.startswith(CHECKPOINTS_PREFIX):
                    cps.append(f)
                elif not (f.name.endswith(COMPRESSED_SUFFIXES)
                          and logical_name(f.name) in names):
                    logs.append(f)
        elif p.is_file():
            (cps if p.name.startswith(CHECKPOINTS_PREFIX) else logs).append(p)
        else:
            raise FileNotFoundError(f"{p}: no such file or directory")
    return list(dict.fromkeys(logs)), list(dict.fromkeys(cps))


def _is_log_name(name: str) -> bool:
    return name.endswith(".jsonl") or (name.endswith(COMPRESSED_SUFFIXES)
                                       and logical_name(name).endswith(".jsonl"))


def compressed_twin(path: Path) -> Path | None:
    """The compressed copy lying next to a plain segment, if any."""
    for suffix in COMPRESSED_SUFFIXES:
        twin = path.with_name(path.name + suffix)
        if twin.exists():
            return twin
    return None


def segment_order(p: Path) -> tuple:
    """Sort key: per origin, in chain order (what the names say)."""
    parsed = parse_segment_name(p.name)
    return (parsed[0], parsed[1], p.name) if parsed else (p.name, 0, p.name)


def iter_records(paths: list[Path], wanted: Callable[[bytes], bool] | None = None,
                 errors: list[str] | None = None) -> Iterator[tuple[str, int, dict]]:
    """(file, line, record) for every parseable record, in file order; no verification.

    Streams: one line in memory at a time. Segments are read per origin in chain order.
    ``wanted(line)`` False skips a line before it is parsed (a reader that needs only some
    records); segments that cannot be read are skipped, and said in ``errors``."""
    logs, _ = collect_files(paths)
    for p in sorted(logs, key=segment_order):
        try:
            for n, _off, raw, _term in iter_lines(Source.of(p)):
                if wanted is not None and not wanted(raw):
                    continue
                try:
                    obj = loads_record(raw)
                except ValueError:
                    continue
                if record_error(obj) is None:
                    yield str(p), n, obj
        except SegmentReadError as exc:
            if errors is not None:
                errors.append(f"{p}: {exc}")


# ------------------------------------------------------------------------------ compression


def compress_segment(path: Path, fmt: str = "zstd",
                     stop: Callable[[], bool] = lambda: False) -> Path | None:
    """Replace a closed plain segment by its compressed copy; returns the new path, or None
    when ``stop()`` said to give up (the original stays; the temp file is removed).

    Crash-safe at every step: the copy is written to ``NAME.zst.tmp`` and fsynced, read back
    and compared with the original's SHA-256, renamed to ``NAME.zst`` (directory fsynced),
    and only then is the original removed (directory fsynced again). A crash leaves the
    original, possibly with a complete copy beside it (see :func:`finish_interrupted`)."""
    suffix = FORMATS[fmt]
    dst = path.with_name(path.name + suffix)
    tmp = dst.with_name(dst.name + TMP_SUFFIX)
    tmp.unlink(missing_ok=True)
    st = path.stat()
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as fin, open(tmp, "xb") as raw_out:
            os.fchmod(raw_out.fileno(), st.st_mode & 0o777)
            if fmt == "zstd":
                cobj = zstandard.ZstdCompressor(level=3).compressobj(size=st.st_size)
                write, finish = (lambda b: raw_out.write(cobj.compress(b)),
                                 lambda: raw_out.write(cobj.flush()))
            else:
                gz = gzip.GzipFile(fileobj=raw_out, mode="wb", mtime=0, filename="")
                write, finish = gz.write, gz.close
            while chunk := fin.read(CHUNK):
                if stop():
                    raise _Stopped
                digest.update(chunk)
                write(chunk)
            finish()
            raw_out.flush()
            os.fsync(raw_out.fileno())
        if file_sha256(tmp) != digest.hexdigest():
            raise OSError(f"{tmp}: compressed copy does not read back as {path.name}")
        os.utime(tmp, ns=(st.st_atime_ns, st.st_mtime_ns))  # age-based retention uses it
        os.rename(tmp, dst)
    except _Stopped:
        tmp.unlink(missing_ok=True)
        return None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    path.unlink()
    fsync_dir(path.parent)
    return dst


class _Stopped(Exception):
    pass


def file_sha256(path: Path) -> str:
    """SHA-256 of a segment's content (decompressed)."""
    digest = hashlib.sha256()
    with open_segment(path) as fh:
        while True:
            try:
                chunk = fh.read(CHUNK)
            except (zstandard.ZstdError, EOFError, gzip.BadGzipFile, zlib.error) as exc:
                raise SegmentReadError(f"{path}: cannot decompress: {exc}") from exc
            if not chunk:
                return digest.hexdigest()
            digest.update(chunk)


def finish_interrupted(directory: Path, names: Iterable[str]) -> list[str]:
    """After a crash mid-compression: remove temp files, and originals whose compressed copy
    is complete and identical. Returns what it did, for the log."""
    done = []
    for name in names:
        path = directory / name
        if name.endswith(TMP_SUFFIX) and logical_name(name[: -len(TMP_SUFFIX)]) != name:
            path.unlink(missing_ok=True)
            done.append(f"removed {name} (interrupted compression)")
            continue
        if not name.endswith(".jsonl"):
            continue
        twin = compressed_twin(path)
        if twin is None:
            continue
        if file_sha256(twin) == file_sha256(path):
            path.unlink()
            done.append(f"removed {name}: {twin.name} holds the same records")
        else:
            done.append(f"kept {name} and {twin.name}: they differ")
    if done:
        fsync_dir(directory)
    return done
