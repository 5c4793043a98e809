"""The audit writer's own process: ``python -m residency_gate.audit.writer_child FD``.

Started by :class:`~residency_gate.audit.writer_process.ProcessAuditWriter`; FD is its end of a
Unix socketpair. Everything the in-process :class:`AuditWriter` does on its worker thread
(recovery at open, building, canonicalising, signing, chaining and writing records, group
commit fsync, rotation, checkpoints, the anchor file) happens here, with AuditWriter's own
code, so it costs the proxy's event loop neither CPU nor the GIL.

Protocol: frames of a 4-byte big-endian length and a ``marshal`` payload (a tuple).

parent -> child
  {config}                      first frame: directory, origin, keys (raw Ed25519), options
  ("a", kind, fields)           append a record
  ("k", raw_private_key)        hand the chain over to a new key (key_rotation record)
  ("c",)                        close: flush, final checkpoint, fsync, exit 0
  ("f", what)                   test fault ("fsync", "write"); honoured only with test_faults

child -> parent
  ("R", info)                   open: chain recovered, start record durable
  ("A", results, stats)         one group commit is durable (fsynced): one result per "a"/"k"
                                frame, in order: (seq, ts, prev, key_id, sig) of the record
                                (the parent has its kind and fields), the whole record (dict)
                                for a key rotation, or an error message (str) for a record
                                that was refused (the writer stays healthy); stats: AuditStats
                                as a tuple
  ("F", kind, message)          fatal: open, write or fsync failed; the child exits
  ("L", levelno, message)       a log message, for the proxy's logging
  ("C", stats)                  closed cleanly

The child also stops (after writing and fsyncing everything it received, and a final
checkpoint) when the socket reports EOF or its parent process is gone: a proxy killed
with SIGKILL leaves no writer behind. It ignores SIGINT/SIGTERM/SIGHUP, which a terminal
or service manager sends to the whole process group: the proxy closes it in order.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import marshal
import os
import select
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from .chain import origin_safe
from .keys import SigningKey
from .writer import AuditError, AuditRecordError, AuditWriter, _Item

log = logging.getLogger("residency_gate.audit")

HEADER = 4
MAX_FRAME = 64 << 20
PARENT_CHECK_SECONDS = 1.0


def frame(payload: bytes) -> bytes:
    return len(payload).to_bytes(HEADER, "big") + payload


def split_frames(buf: bytearray) -> list[Any]:
    """Remove every complete frame from ``buf``; return their decoded messages."""
    out = []
    pos, end = 0, len(buf)
    while end - pos >= HEADER:
        n = int.from_bytes(buf[pos:pos + HEADER], "big")
        if n > MAX_FRAME:
            raise ValueError(f"audit frame of {n} bytes")
        if end - pos - HEADER < n:
            break
        out.append(marshal.loads(buf[pos + HEADER:pos + HEADER + n]))
        pos += HEADER + n
    if pos:
        del buf[:pos]
    return out


def lock_path(directory: Path, origin: str) -> Path:
    return Path(directory) / f".{origin_safe(origin)}.lock"


class _Child:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = bytearray()
        self.eof = False
        self.writer: AuditWriter | None = None
        self.test_faults = False

    # -------------------------------------------------------------- I/O

    def send(self, msg: tuple) -> None:
        self.sock.sendall(frame(marshal.dumps(msg)))

    def read_available(self, block: bool) -> list[Any]:
        """Everything the parent has sent so far (waits for the first bytes if ``block``)."""
        flags = 0 if block else socket.MSG_DONTWAIT
        while True:
            try:
                data = self.sock.recv(1 << 20, flags)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                data = b""
            if not data:
                self.eof = True
                break
            self.buf += data
            flags = socket.MSG_DONTWAIT
        return split_frames(self.buf)

    def read_config(self) -> dict:
        while True:
            msgs = self.read_available(block=True)
            if msgs:
                return msgs[0]
            if self.eof:
                raise SystemExit(0)

    # -------------------------------------------------------------- setup

    def open(self, cfg: dict) -> AuditWriter:
        keys = [SigningKey.from_private(Ed25519PrivateKey.from_private_bytes(raw))
                for raw in cfg["retired"]]
        key = SigningKey.from_private(Ed25519PrivateKey.from_private_bytes(cfg["key"]),
                                      tuple(keys))
        directory = Path(cfg["directory"])
        self.test_faults = bool(cfg.get("test_faults"))
        w = AuditWriter(
            directory, key, cfg["origin"], fsync=cfg["fsync"],
            rotate_bytes=cfg["rotate_bytes"], rotate_seconds=cfg["rotate_seconds"],
            checkpoint_every=cfg["checkpoint_every"],
            checkpoint_seconds=cfg["checkpoint_seconds"],
            anchor_file=Path(cfg["anchor_file"]) if cfg.get("anchor_file") else None,
        )
        w.pid = cfg.get("pid") or os.getpid()
        try:
            directory.mkdir(parents=True, exist_ok=True)
            self.lock(lock_path(directory, cfg["origin"]), cfg["lock_timeout"])
        except OSError as exc:
            raise AuditError(f"cannot open audit log in {directory}: {exc}") from exc
        w.open()
        self.writer = w
        return w

    def lock(self, path: Path, timeout: float) -> None:
        """One writer per origin and directory: a predecessor (e.g. the writer of a proxy
        that was just killed, still flushing) finishes before this one recovers the chain."""
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o640)
        deadline = time.monotonic() + timeout
        warned = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return  # fd stays open (and locked) until this process exits
            except OSError as exc:
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    os.close(fd)
                    raise
            if time.monotonic() >= deadline:
                os.close(fd)
                raise AuditError(
                    f"another audit writer holds {path} (same origin and directory) for more "
                    f"than {timeout:.0f}s; give every proxy instance its own audit.origin")
            if not warned:
                log.warning("audit log %s is in use by another writer; waiting for it", path)
                warned = True
            time.sleep(0.05)

    # -------------------------------------------------------------- main loop

    def fault(self, what: str) -> None:
        if not self.test_faults:
            return
        from . import writer as wmod

        def failing_fsync(fd: int) -> None:
            raise OSError(errno.EIO, "Input/output error (test fault)")

        def failing_write(fd: int, data: bytes) -> None:
            raise OSError(errno.ENOSPC, "No space left on device (test fault)")

        if what == "fsync":
            wmod.os.fsync = failing_fsync  # type: ignore[assignment]
        elif what == "write":
            wmod._write_all = failing_write  # type: ignore[assignment]

    def run(self) -> int:
        w = self.writer
        assert w is not None
        ppid = os.getppid()
        closing = False
        while not closing:
            timeout = w._checkpoint_timeout()
            timeout = PARENT_CHECK_SECONDS if timeout is None else min(timeout,
                                                                       PARENT_CHECK_SECONDS)
            readable, _, _ = select.select([self.sock], [], [], timeout)
            msgs = self.read_available(block=False) if readable else []
            items: list[_Item] = []
            slots: list[int | str] = []  # per answered frame: index into items, or an error
            for msg in msgs:
                op = msg[0]
                if op == "a":
                    try:
                        item = w._prepare(msg[1], msg[2])
                    except AuditRecordError as exc:
                        slots.append(str(exc))
                        continue
                    slots.append(len(items))
                    items.append(item)
                elif op == "k":
                    new = SigningKey.from_private(Ed25519PrivateKey.from_private_bytes(msg[1]))
                    slots.append(len(items))
                    items.append(_Item("key_rotation", {}, None, new))
                elif op == "c":
                    closing = True
                elif op == "f":
                    self.fault(msg[1])
            if self.eof or os.getppid() != ppid:
                closing = True
            if items or w._cp_time_due():
                try:
                    records = w._write_batch(items)
                except Exception as exc:
                    return self.fatal("write", exc)
                if slots:
                    results = [_envelope(records[s]) if isinstance(s, int) else s
                               for s in slots]
                    self.reply(("A", results, _stats(w)))
            elif slots:  # only refused records
                self.reply(("A", slots, _stats(w)))
        try:
            w._finish([])
        except Exception as exc:
            return self.fatal("close", exc)
        self.reply(("C", _stats(w)))
        return 0

    def reply(self, msg: tuple) -> None:
        try:
            self.send(msg)
        except OSError:
            self.eof = True  # the parent is gone: keep writing what we have, then stop

    def fatal(self, what: str, exc: BaseException) -> int:
        w = self.writer
        if w is not None:
            w._close_fd()
            w.stats.write_failures += 1
        path = (w._path or w.directory) if w is not None else "?"
        self.reply(("F", what, f"{type(exc).__name__}: {exc} ({path})"))
        return 2


def _envelope(rec: dict) -> tuple | dict:
    """What the parent needs to rebuild an appended record: it has kind and fields."""
    if rec["kind"] == "key_rotation":
        return rec
    return (rec["seq"], rec["ts"], rec["prev"], rec["key_id"], rec["sig"])


def _stats(w: AuditWriter) -> tuple:
    return tuple(vars(w.stats).values())


class _ForwardHandler(logging.Handler):
    """Send the child's log records to the proxy, which logs them its own way."""

    def __init__(self, child: _Child) -> None:
        super().__init__(logging.DEBUG)
        self.child = child

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.child.reply(("L", record.levelno, record.getMessage()))
        except Exception:
            pass


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    sock = socket.socket(fileno=int(argv[0]))
    sock.setblocking(True)
    child = _Child(sock)
    root = logging.getLogger("residency_gate")
    root.handlers[:] = [_ForwardHandler(child)]
    root.setLevel(logging.INFO)
    root.propagate = False
    cfg = child.read_config()
    try:
        child.open(cfg)
    except Exception as exc:  # AuditError, or a bad key: the parent raises AuditError
        child.reply(("F", "open", str(exc)))
        return 1
    w = child.writer
    assert w is not None
    child.reply(("R", {"pid": os.getpid(), "seq": w.next_seq, "head": w.head,
                       "stats": _stats(w)}))
    return child.run()


if __name__ == "__main__":
    sys.exit(main())
