"""Signed checkpoint lines: the checkpoints files, the anchor, --from-checkpoint.

A checkpoint line ``{v, origin, size, head, ts, key_id, sig}`` says, signed, that the chain
of ``origin`` held ``size`` records and that the hash of the last one is ``head`` (a C2SP
tlog checkpoint). The verifier reads these files one line at a time, merged with the log by
size; this module only reads and shapes them.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .canonical import canonical, loads_record
from .chain import VERSION
from .segments import SegmentReadError, Source, iter_lines


@dataclass
class CheckpointLine:
    """A structurally valid checkpoint line (checkpoints file, anchor, --from-checkpoint)."""

    src: int
    source: str
    lineno: int
    raw: bytes
    obj: dict

    @property
    def size(self) -> int:
        return self.obj["size"]


def checkpoint_shape_ok(o: Any) -> bool:
    return (isinstance(o, dict) and o.get("v") == VERSION
            and isinstance(o.get("origin"), str) and type(o.get("size")) is int
            and o["size"] >= 0 and isinstance(o.get("head"), str)
            and isinstance(o.get("key_id"), str))


def checkpoint_lines(src: Source, idx: int
                     ) -> Iterator[CheckpointLine | tuple[int, bytes, bool, str, bool]]:
    """Valid checkpoint lines, and (line, raw, terminated, error, last) for the others."""
    lines = iter_lines(src)
    pending = next(lines, None)
    while pending is not None:
        nxt = next(lines, None)
        lineno, _off, raw, term = pending
        try:
            obj = loads_record(raw)
        except ValueError as exc:
            yield (lineno, raw, term, str(exc).splitlines()[0][:200], nxt is None)
        else:
            if checkpoint_shape_ok(obj):
                yield CheckpointLine(idx, src.name, lineno, raw, obj)
            else:
                yield (lineno, raw, term, "", nxt is None)
        pending = nxt


def checkpoint_lines_or_none(src: Source, idx: int) -> Iterator[CheckpointLine | tuple]:
    try:
        yield from checkpoint_lines(src, idx)
    except SegmentReadError:
        return  # reported by scan_checkpoint_files


def load_start(text: str) -> list[dict]:
    """--from-checkpoint: a file of signed checkpoint lines (an anchor or checkpoints file,
    or one line cut from it), or one such line itself. Raises ValueError."""
    text = text.strip()
    data = text.encode() if text.startswith("{") else Path(text).read_bytes()
    out = []
    for n, raw in enumerate(data.splitlines(), 1):
        if not raw.strip():
            continue
        try:
            obj = loads_record(raw.strip())
        except ValueError as exc:
            raise ValueError(f"line {n}: not a checkpoint line: {exc}") from None
        if not checkpoint_shape_ok(obj):
            raise ValueError(f"line {n}: not a signed checkpoint line")
        out.append(obj)
    if not out:
        raise ValueError("no checkpoint line")
    return out


def start_lines(starts: Iterable[dict] | None) -> list[CheckpointLine]:
    out = []
    for i, o in enumerate(starts or ()):
        raw = canonical(o)
        out.append(CheckpointLine(-1, "--from-checkpoint", i + 1, raw, o))
    return out
