"""Starting and stopping the writer process (writer_child.py) for ProcessAuditWriter: the
child on its end of a socketpair, its configuration sent, the handshake until it has
recovered the chain (or failed), and a stop that lets it flush first."""

from __future__ import annotations

import logging
import marshal
import os
import socket
import subprocess
import sys
import time
from multiprocessing.connection import Connection
from pathlib import Path

from cryptography.hazmat.primitives import serialization

from .keys import SigningKey
from .writer_api import AuditError
from .writer_child import MAX_FRAME

log = logging.getLogger("residency_gate.audit")

_PKG_ROOT = str(Path(__file__).resolve().parents[2])  # the directory holding residency_gate/


def raw_key(key: SigningKey) -> bytes:
    return key.private.private_bytes(serialization.Encoding.Raw,
                                     serialization.PrivateFormat.Raw,
                                     serialization.NoEncryption())


def start_child(config: dict, key: SigningKey, directory: Path, start_timeout: float,
                stop_timeout: float) -> tuple[subprocess.Popen, socket.socket, dict]:
    """(the process, our end of the socket, its ready message) once the writer process has
    recovered the chain and written its ``start`` record. Raises AuditError (the process,
    if it started, is stopped)."""
    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (_PKG_ROOT, env.get("PYTHONPATH")) if p)
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "residency_gate.audit.writer_child", str(child.fileno())],
            pass_fds=(child.fileno(),), stdin=subprocess.DEVNULL, env=env,
        )
    except OSError as exc:
        parent.close()
        raise AuditError(f"cannot start the audit writer process: {exc}") from exc
    finally:
        child.close()
    cfg = dict(config, pid=os.getpid(), key=raw_key(key),
               retired=[raw_key(k) for k in key.retired])
    conn = Connection(os.dup(parent.fileno()))  # blocking, for the handshake only
    try:
        conn.send_bytes(marshal.dumps(cfg))
        ready = _handshake(conn, proc, directory, time.monotonic() + start_timeout)
    except (OSError, AuditError, ValueError, EOFError) as exc:
        stop_child(proc, parent, kill=True, timeout=stop_timeout)
        if isinstance(exc, AuditError):
            raise
        raise AuditError(f"cannot open audit log in {directory}: "
                         f"audit writer process: {exc}") from exc
    finally:
        conn.close()
    return proc, parent, ready


def _handshake(conn: Connection, proc: subprocess.Popen, directory: Path,
               deadline: float) -> dict:
    """Read messages (blocking) until the child reports ready or failed."""
    while True:
        left = deadline - time.monotonic()
        if left <= 0 or not conn.poll(left):
            raise AuditError("the audit writer process did not answer in time")
        try:
            msg = marshal.loads(conn.recv_bytes(MAX_FRAME))
        except EOFError:
            code = proc.wait(5)
            raise AuditError(f"the audit writer process exited (code {code})") from None
        op = msg[0]
        if op == "R":
            return msg[1]
        if op == "L":
            log.log(msg[1], "%s", msg[2])
        elif op == "F":
            raise AuditError(msg[2] if msg[1] == "open" else
                             f"cannot open audit log in {directory}: {msg[2]}")


def stop_child(proc: subprocess.Popen | None, sock: socket.socket | None, *, kill: bool,
               timeout: float) -> None:
    """Close our end (EOF: a child still running flushes and exits) and wait for it;
    ``kill``: at once."""
    if sock is not None:
        try:
            sock.close()
        except OSError:
            pass
    if proc is None:
        return
    if kill and proc.poll() is None:
        proc.kill()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        log.error("audit writer process %d did not exit; killing it", proc.pid)
        proc.kill()
        proc.wait(5)
