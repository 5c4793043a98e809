"""The audit signing key pair in certs_dir, and key rotation.

Files (all in certs_dir):
  audit-signing-key.pem                  current private key, PKCS8 PEM, mode 0600
  audit-signing-key.pub.pem              current public key, SubjectPublicKeyInfo PEM
  audit-signing-key.<16 hex>.pem         a retired private key (kept until the proxy has
                                         written the hand-over record signed with it)
  audit-signing-key.<16 hex>.pub.pem     a retired public key (keep it: old records need it)
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from ..fileio import write_atomic

log = logging.getLogger("residency_gate.audit")

PRIVATE_NAME = "audit-signing-key.pem"
PUBLIC_NAME = "audit-signing-key.pub.pem"


class AuditKeyError(ValueError):
    """A key file is missing, unreadable or not an Ed25519 key."""


def public_raw(public: Ed25519PublicKey) -> bytes:
    return public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def key_id_for(public: Ed25519PublicKey) -> str:
    """``ed25519:`` + the first 16 hex digits of SHA-256 over the raw public key."""
    return "ed25519:" + hashlib.sha256(public_raw(public)).hexdigest()[:16]


@dataclass(frozen=True)
class SigningKey:
    private: Ed25519PrivateKey
    key_id: str
    # Retired keys whose private half is still in certs_dir: the writer uses one of them
    # to sign the hand-over record when the log it continues was signed with it.
    retired: tuple[SigningKey, ...] = field(default=(), compare=False, repr=False)

    @property
    def public(self) -> Ed25519PublicKey:
        return self.private.public_key()

    def sign(self, data: bytes) -> bytes:
        return self.private.sign(data)

    @classmethod
    def from_private(cls, private: Ed25519PrivateKey, retired: tuple = ()) -> SigningKey:
        return cls(private, key_id_for(private.public_key()), tuple(retired))

    @classmethod
    def generate(cls) -> SigningKey:
        return cls.from_private(Ed25519PrivateKey.generate())








def _private_pem(private: Ed25519PrivateKey) -> bytes:
    return private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _public_pem(public: Ed25519PublicKey) -> bytes:
    return public.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _load_private(path: Path) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise AuditKeyError(f"{path}: cannot load private key: {exc}") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise AuditKeyError(f"{path}: not an Ed25519 private key")
    return key


def _hex_of(key_id: str) -> str:
    return key_id.split(":", 1)[1]


def _retired_private(certs_dir: Path) -> tuple[SigningKey, ...]:
    out = []
    for path in sorted(certs_dir.glob("audit-signing-key.????????????????.pem")):
        try:
            out.append(SigningKey.from_private(_load_private(path)))
        except AuditKeyError as exc:
            log.warning("ignoring retired audit key: %s", exc)
    return tuple(out)


def load_or_create_signing_key(certs_dir: Path) -> SigningKey:
    """Load certs_dir/audit-signing-key.pem, creating the key pair if it is missing."""
    certs_dir = Path(certs_dir)
    certs_dir.mkdir(parents=True, exist_ok=True)
    priv_path = certs_dir / PRIVATE_NAME
    pub_path = certs_dir / PUBLIC_NAME
    if priv_path.exists():
        private = _load_private(priv_path)
        mode = priv_path.stat().st_mode & 0o777
        if mode & 0o077:
            log.warning("%s is readable by group/others (mode %o); it should be 0600",
                        priv_path, mode)
    else:
        private = Ed25519PrivateKey.generate()
        write_atomic(priv_path, _private_pem(private), 0o600)
        log.info("created audit signing key %s", priv_path)
    public_pem = _public_pem(private.public_key())
    if not pub_path.exists():
        write_atomic(pub_path, public_pem, 0o644)
    elif pub_path.read_bytes().strip() != public_pem.strip():
        raise AuditKeyError(
            f"{pub_path} does not match {priv_path}; remove the stale public key file"
        )
    return SigningKey.from_private(private, _retired_private(certs_dir))


def _load_public_file(path: Path) -> list[Ed25519PublicKey]:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise AuditKeyError(f"{path}: {exc.strerror or exc}") from exc
    try:
        key = serialization.load_pem_public_key(data)
    except ValueError:
        try:
            priv = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError) as exc:
            raise AuditKeyError(f"{path}: not a PEM public or private key") from exc
        key = priv.public_key()
    if not isinstance(key, Ed25519PublicKey):
        raise AuditKeyError(f"{path}: not an Ed25519 key")
    return [key]


def load_public_keys(paths: Iterable[Path]) -> dict[str, Ed25519PublicKey]:
    """key_id -> public key for PEM files (public, or private: its public half).

    A directory stands for every ``*.pub.pem`` in it.
    """
    out: dict[str, Ed25519PublicKey] = {}
    for p in paths:
        p = Path(p)
        files = sorted(p.glob("*.pub.pem")) if p.is_dir() else [p]
        for f in files:
            for key in _load_public_file(f):
                out[key_id_for(key)] = key
    return out


def default_public_keys(certs_dir: Path) -> dict[str, Ed25519PublicKey]:
    """The current and retired public keys in certs_dir (what `audit verify` trusts by default)."""
    certs_dir = Path(certs_dir)
    files = [certs_dir / PUBLIC_NAME] if (certs_dir / PUBLIC_NAME).exists() else []
    files += sorted(certs_dir.glob("audit-signing-key.????????????????.pub.pem"))
    return load_public_keys(files)


def rotate_key(certs_dir: Path) -> tuple[SigningKey, SigningKey]:
    """Retire the current key and install a new one; returns (old, new).

    The old key pair is kept as audit-signing-key.<hex>.pem / .pub.pem. The proxy picks the
    new key up at its next start and, as its first act, writes a ``key_rotation`` record
    signed with the old key that names the new key (the hand-over a verifier follows).
    """
    certs_dir = Path(certs_dir)
    priv_path = certs_dir / PRIVATE_NAME
    if not priv_path.exists():
        raise AuditKeyError(f"{priv_path} does not exist: nothing to rotate")
    old = SigningKey.from_private(_load_private(priv_path))
    h = _hex_of(old.key_id)
    write_atomic(certs_dir / f"audit-signing-key.{h}.pem", _private_pem(old.private), 0o600)
    write_atomic(certs_dir / f"audit-signing-key.{h}.pub.pem", _public_pem(old.public), 0o644)
    new_private = Ed25519PrivateKey.generate()
    write_atomic(priv_path, _private_pem(new_private), 0o600)
    write_atomic(certs_dir / PUBLIC_NAME, _public_pem(new_private.public_key()), 0o644)
    retired = _retired_private(certs_dir)
    return old, SigningKey.from_private(new_private, retired)
