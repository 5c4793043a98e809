"""Fault injection for the audit writer process, for tests only (test_audit_process.py).

Python imports this at start-up when this directory is on PYTHONPATH. With
RESIDENCY_GATE_TEST_FAULT=fsync or =write and RESIDENCY_GATE_TEST_FAULT_ARM=PATH, once PATH
exists every os.fsync fails with EIO, or every os.write to a regular file with ENOSPC, as a
failing disk would; with =garbage, every message the writer process sends is not marshal
data. The test creates PATH when the fault should start. Without those variables it does
nothing.
"""

import errno
import os
import stat

_WHAT = os.environ.get("RESIDENCY_GATE_TEST_FAULT")
_ARM = os.environ.get("RESIDENCY_GATE_TEST_FAULT_ARM")

if _WHAT and _ARM:
    _real_fsync, _real_write = os.fsync, os.write

    def _fsync(fd: int) -> None:
        if os.path.exists(_ARM):
            raise OSError(errno.EIO, "Input/output error (test fault)")
        _real_fsync(fd)

    def _write(fd: int, data: bytes) -> int:
        # only files: the writer's socket to the proxy keeps working
        if os.path.exists(_ARM) and stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.ENOSPC, "No space left on device (test fault)")
        return _real_write(fd, data)

    if _WHAT == "fsync":
        os.fsync = _fsync
    elif _WHAT == "write":
        os.write = _write
    elif _WHAT == "garbage":
        from multiprocessing.connection import Connection

        _real_send = Connection.send_bytes

        def _send_bytes(self: Connection, buf: bytes, *args: int) -> None:
            _real_send(self, b"\xff not marshal" if os.path.exists(_ARM) else buf, *args)

        Connection.send_bytes = _send_bytes  # type: ignore[method-assign]
