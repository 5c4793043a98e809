"""The signed checkpoints of the checkpoints files and the anchor, held against one origin's
chain as it is read: merged in size order, each compared with the hash of the record it
covers (``rollback`` when it differs, or when the log ends before it).
"""

from __future__ import annotations

from .checkpoints import CheckpointLine


class CheckpointCheck:
    """External checkpoints of one origin. A part of :class:`~residency_gate.audit.origin_check.OriginCheck` (its state and ``add``),
    kept apart so each file owns one question."""

    def _next_cp(self) -> None:
        sizes = [h.size - 1 for h in self.heads if h is not None]
        self.cp_next = min(sizes) if sizes else -1

    def _advance_cps(self, seq: int) -> None:
        for i, head in enumerate(self.heads):
            cursor = self.cursors[i]
            while head is not None and head.size - 1 <= seq:
                self._cp_line(head, seq)
                head = next(cursor, None)
            self.heads[i] = head
        self._next_cp()

    def _hash_at(self, seq: int) -> str | None:
        h = self.recent.get(seq)
        return h if h is not None else self.cp_hashes.get(seq)

    def _cp_line(self, cp: CheckpointLine, top: int | None) -> None:
        """Check one checkpoint line against the log read so far (top: the seq reached)."""
        o = cp.obj
        key = (1, cp.src, cp.lineno)
        if not self.v.cp_authentic(cp, self.trusted, key, self.add):
            return
        size = o["size"]
        if size == 0:
            return
        have = self._hash_at(size - 1)
        if have is None:
            if top is None or top < size - 1:
                best = self.best.get(cp.src)
                if best is None or best.size < size:
                    self.best[cp.src] = cp
            # else: record size-1 is missing in the middle (a gap), pruned, or out of reach
            return
        if have != o["head"]:
            self.add(key, "rollback", f"record {size - 1} differs from the signed checkpoint "
                     f"(size {size}): the log was rolled back or rewritten", file=cp.source,
                     line=cp.lineno, seq=size - 1)
            return
        rep = self.rep
        if rep.anchored_size is None or rep.anchored_size < size:
            rep.anchored_size = size
        if cp.src == self.v.anchor_idx and (rep.anchor_size is None or rep.anchor_size < size):
            rep.anchor_size = size

