"""The audit writer's own process: ``python -m residency_gate.audit.writer_child FD``.

Started by :class:`~residency_gate.audit.writer_process.ProcessAuditWriter`; FD is its end of a
Unix socketpair. Everything the in-process :class:`AuditWriter` does on its worker thread
(recovery at open, building, canonicalising, signing, chaining and writing records, group
commit fsync, rotation, checkpoints, the anchor file) happens here, through the synchronous
API of :class:`~residency_gate.audit.chain_writer.ChainWriter` (``open``, ``append_batch``,
``rotate_key_sync``, ``close_sync``), so it costs the proxy's event loop neither CPU nor the
GIL. So do compression and retention of rotated segments (housekeeping.py's thread). The
fields arrive as a fresh copy (unmarshalled here), which the writer uses without copying.

Protocol: messages framed as :class:`multiprocessing.connection.Connection` frames them (a
4-byte big-endian length, then the payload), each payload a ``marshal``-ed tuple.

parent -> child
  {config}                      first message: directory, origin, keys (raw Ed25519), options
  ("a", kind, fields)           append a record
  ("k", raw_private_key)        hand the chain over to a new key (key_rotation record)
  ("c",)                        close: flush, final checkpoint, fsync, exit 0

child -> parent
  ("R", info)                   open: chain recovered, start record durable
  ("A", results, stats)         one group commit is durable (fsynced): one result per "a"/"k"
                                message, in order: (seq, ts, prev, key_id, sig) of the record
                                (the parent has its kind and fields), the whole record (dict)
                                for a key rotation, or an error message (str) for a record
                                that was refused (the writer stays healthy); stats: AuditStats
                                as a tuple
  ("F", kind, message)          fatal: open, write or fsync failed; the child exits
  ("L", levelno, message)       a log message, for the proxy's logging
  ("C", stats)                  closed cleanly

Everything the parent has sent by the time the child looks is one group commit. The child
also stops (after writing and fsyncing everything it received, and a final checkpoint)
when the socket reports EOF or its parent process is gone: a proxy killed with SIGKILL
leaves no writer behind. It ignores SIGINT/SIGTERM/SIGHUP, which a terminal or service
manager sends to the whole process group: the proxy closes it in order.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import marshal
import os
import select
import signal
import sys
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from .chain import origin_safe
from .chain_writer import ChainWriter
from .keys import SigningKey
from .writer_api import AuditError, AuditRecordError, WriterSettings

log = logging.getLogger("residency_gate.audit")

MAX_FRAME = 64 << 20
HEADER = 4  # multiprocessing.connection's length prefix: 4 bytes, big-endian
READ_BYTES = 1 << 20
PARENT_CHECK_SECONDS = 1.0


def lock_path(directory: Path, origin: str) -> Path:
    return Path(directory) / f".{origin_safe(origin)}.lock"


def _key(raw: bytes, retired: tuple[SigningKey, ...] = ()) -> SigningKey:
    return SigningKey.from_private(Ed25519PrivateKey.from_private_bytes(raw), retired)


class _Child:
    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        # readiness by one poll object: Connection.poll() builds a selector per call (~4 µs)
        self.readable = select.poll()
        self.readable.register(conn.fileno(), select.POLLIN)
        self.eof = False
        self.fd = conn.fileno()
        self.buf = bytearray()  # received, not yet a whole message
        self.writer: ChainWriter | None = None

    # -------------------------------------------------------------- I/O

    def receive(self, timeout: float | None) -> list[Any]:
        """Every message the parent has sent by now, waiting up to ``timeout`` for the first.

        Reads what the socket holds in one read (not two per message, as Connection does)
        and splits it into frames; a frame not complete yet waits for the next call."""
        msgs: list[Any] = []
        buf = self.buf
        try:
            while not self.eof and self.readable.poll(
                    0 if msgs else None if timeout is None else timeout * 1000):
                data = os.read(self.fd, READ_BYTES)
                if not data:
                    raise EOFError
                buf += data
                pos, end = 0, len(buf)
                while end - pos >= HEADER:
                    size = int.from_bytes(buf[pos:pos + HEADER], "big", signed=True)
                    if not 0 <= size <= MAX_FRAME:
                        raise OSError(f"bad message length {size}")
                    if end - pos - HEADER < size:
                        break
                    pos += HEADER
                    msgs.append(marshal.loads(buf[pos:pos + size]))
                    pos += size
                del buf[:pos]
        except (EOFError, OSError):
            self.eof = True
        return msgs

    def reply(self, msg: tuple) -> None:
        try:
            self.conn.send_bytes(marshal.dumps(msg))
        except OSError:
            self.eof = True  # the parent is gone: keep writing what we have, then stop

    # -------------------------------------------------------------- setup

    def open(self, cfg: dict) -> ChainWriter:
        key = _key(cfg["key"], tuple(_key(raw) for raw in cfg["retired"]))
        directory = Path(cfg["directory"])
        w = ChainWriter(directory, key, cfg["origin"],
                        settings=WriterSettings.from_wire(cfg["settings"]))
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

    def run(self) -> int:
        w = self.writer
        assert w is not None
        ppid = os.getppid()
        closing = False
        while not closing:
            due = w.checkpoint_due_in()
            msgs = self.receive(PARENT_CHECK_SECONDS if due is None
                                else min(due, PARENT_CHECK_SECONDS))
            results: list[dict | AuditRecordError] = []
            batch: list[tuple[str, dict]] = []
            try:
                for msg in msgs:
                    op = msg[0]
                    if op == "a":
                        batch.append((msg[1], msg[2]))
                    elif op == "k":  # in order: what came before is written first
                        results += w.append_batch(batch, owned=True)
                        batch = []
                        results.append(w.rotate_key_sync(_key(msg[1])))
                    elif op == "c":
                        closing = True
                # fields fresh from marshal: the writer's own (no copy); also a time
                # checkpoint, when due
                results += w.append_batch(batch, owned=True)
            except AuditError:
                return self.fatal("write")
            if results:
                self.reply(("A", [_result(r) for r in results], _stats(w)))
            if self.eof or os.getppid() != ppid:
                closing = True
        try:
            w.close_sync()
        except AuditError:
            return self.fatal("close")
        self.reply(("C", _stats(w)))
        return 0

    def fatal(self, what: str) -> int:
        """Tell the parent why the writer failed (it logged CRITICAL already), and exit."""
        w = self.writer
        assert w is not None
        exc = w.failure
        self.reply(("F", what, f"{type(exc).__name__}: {exc} "
                               f"({w.current_file or w.directory})"))
        return 2


def _result(rec: dict | AuditRecordError) -> tuple | dict | str:
    """What the parent needs to answer an append: it has kind and fields."""
    if isinstance(rec, AuditRecordError):
        return str(rec)
    if rec["kind"] == "key_rotation":
        return rec
    return (rec["seq"], rec["ts"], rec["prev"], rec["key_id"], rec["sig"])


def _stats(w: ChainWriter) -> tuple:
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
    child = _Child(Connection(int(argv[0])))
    root = logging.getLogger("residency_gate")
    root.handlers[:] = [_ForwardHandler(child)]
    root.setLevel(logging.INFO)
    root.propagate = False
    msgs = child.receive(None)
    if not msgs:  # EOF before the config: the parent is gone
        return 0
    try:
        w = child.open(msgs[0])
    except Exception as exc:  # AuditError, or a bad key: the parent raises AuditError
        child.reply(("F", "open", str(exc)))
        return 1
    child.reply(("R", {"pid": os.getpid(), "seq": w.next_seq, "head": w.head,
                       "stats": _stats(w)}))
    return child.run()


if __name__ == "__main__":
    sys.exit(main())
