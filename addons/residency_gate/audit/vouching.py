"""Which records of one origin are authentic: a run of records vouched for by the signed
checkpoint record that ends it, or each record checked on its own (canonical form and
signature, here or by a worker process); key hand-overs and key changes; the checks of
the records that steer verification (key_rotation, checkpoint, torn_tail, prune).
"""

from __future__ import annotations

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from .chain import HEX64_RE, b64_strict
from .gaps import MAX_PENDING
from .keys import key_id_for
from .scan import Rec
from .signatures import check_record_cached
from .verdict import WARNING

KIND_CHECKED = frozenset({"key_rotation", "checkpoint", "torn_tail", "prune"})


class Vouching:
    """Authenticity of one origin's records. A part of :class:`~residency_gate.audit.origin_check.OriginCheck` (its state and ``add``),
    kept apart so each file owns one question."""

    def _close_run(self) -> None:
        """The run ends in a checkpoint record: if its signature verifies (and it agrees with
        its place in the chain), it vouches for every record of the run."""
        run = self.run
        cp = run[-1]
        obj = self._materialize(cp)
        check = self._check(cp)
        ok = (check == (True, True) and obj.get("size") == cp.seq
              and obj.get("head") == cp.prev)
        self.run = []
        if ok:
            self.rep.checkpoints_verified += 1
            for e in run[:-1]:
                if e.key_id is None:  # read the fast way: written with the checkpoint's key
                    e.key_id = cp.key_id
                self._settle(e, (True, True), vouched=True)
            self._settle(cp, check)
        else:
            for e in run[:-1]:
                self._settle(e, None)
            self._settle(cp, check)

    def _settle_run(self) -> None:
        if self.run:
            run, self.run = self.run, []
            for e in run:
                self._settle(e, None)

    def _check(self, e: Rec) -> tuple[bool, bool | None]:
        """(canonical, signature) of a record: the worker's answer or checked here."""
        obj = self._materialize(e)
        public = self.trusted.get(e.key_id)
        result = self.checks.get(e.fidx)
        if result is not None and public is not None:
            used = result.keys.get(e.key_id)
            if used is not None and used == self.trusted_raw.get(e.key_id):
                return result.failures.get(e.lineno, (True, True))
        return check_record_cached(e.raw, e.h, obj, public, self.trusted_raw.get(e.key_id))

    def _settle(self, e: Rec, check: tuple[bool, bool | None] | None,
                vouched: bool = False) -> None:
        seq = e.seq
        if check is None:
            check = self._check(e)
        key_id = e.key_id
        public = self.trusted.get(key_id)
        canon, sig_ok = check
        if not vouched and public is not None:
            self.rep.signatures_checked += 1
        authentic = True
        if not canon:
            self.add((*e.key, 3), "not-canonical", "line is not canonical JSON (key order, "
                     "whitespace or escaping changed)", file=e.name, line=e.lineno, seq=seq)
            authentic = False
        if public is None:
            self.add((*e.key, 4), "unknown-key", f"signed with {key_id}, which is not a "
                     "trusted key", file=e.name, line=e.lineno, seq=seq)
            authentic = False
        elif not sig_ok:
            self.add((*e.key, 4), "bad-signature", f"signature does not verify with "
                     f"{key_id}", file=e.name, line=e.lineno, seq=seq)
            authentic = False
        else:
            if key_id != self.chain_key:
                if key_id not in self.rep.keys:
                    self.rep.keys.append(key_id)
                if self.chain_key is not None and key_id != self.handed_over:
                    self.add((*e.key, 5), "key-change", f"key changes from {self.chain_key} "
                             f"to {key_id} without a key_rotation hand-over", file=e.name,
                             line=e.lineno, seq=seq, severity=WARNING)
                self.chain_key = key_id
            self.handed_over = None
        kind = e.kind
        if authentic and kind in KIND_CHECKED:
            rec = self._materialize(e)
            kind_err = self._kind_checks(rec)
            if kind == "key_rotation" and kind_err is None:
                self.handed_over = rec["new_key_id"]
            if kind_err:
                self.add((*e.key, 6), kind_err[0], kind_err[1], file=e.name, line=e.lineno,
                         seq=seq)
                authentic = kind == "checkpoint"  # a checkpoint's own data is fine
        cur = self.cur
        if authentic and e.linked and cur is not None and cur[1] == seq - 1:
            cur[1] = seq
        elif authentic:
            self.cur = [seq, seq]
            self.ranges.append(self.cur)
        else:
            self.cur = None
        if self.v.on_record is not None:
            self.v.on_record(e.name, e.lineno, e.obj, authentic)
        if self.v.collected is not None:
            self.v.collected.append((e.name, e.lineno, self._materialize(e)))

    def _kind_checks(self, rec: dict) -> tuple[str, str] | None:
        kind = rec["kind"]
        if kind == "key_rotation":
            raw = b64_strict(rec.get("new_public_key"))
            if raw is None or len(raw) != 32:
                return ("invalid-format", "key_rotation without a valid new_public_key")
            new = Ed25519PublicKey.from_public_bytes(raw)
            if key_id_for(new) != rec.get("new_key_id"):
                return ("invalid-format", "key_rotation: new_key_id does not match the key")
            self.trusted[rec["new_key_id"]] = new
            self.trusted_raw[rec["new_key_id"]] = raw
        elif kind == "checkpoint":
            if rec.get("size") != rec["seq"] or rec.get("head") != rec["prev"]:
                return ("checkpoint-mismatch", "checkpoint size/head do not match its place "
                        "in the chain")
        elif kind == "torn_tail":
            f = rec.get("file")
            if not isinstance(f, str) or f not in self.v.logical_names:
                return ("invalid-format", f"torn_tail names file {f!r}, which is not among "
                        "the files verified")
        elif kind == "prune":
            cp = rec.get("checkpoint")
            through = rec.get("through")
            if not (type(through) is int and isinstance(cp, dict)
                    and cp.get("size") == through + 1 and isinstance(cp.get("head"), str)
                    and HEX64_RE.match(cp["head"])):
                return ("invalid-format", "prune record without a valid through/checkpoint")
            if len(self.prunes) < MAX_PENDING:
                self.prunes.append(rec)
        return None

