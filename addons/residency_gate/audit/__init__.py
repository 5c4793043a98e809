"""The signed, hash-chained audit trail (writer, verifier, CLI)."""

from .canonical import CanonicalError, canonical
from .keys import (
    SigningKey,
    default_public_keys,
    load_or_create_signing_key,
    load_public_keys,
    rotate_key,
)
from .writer import AuditError, AuditRecordError, AuditStats, AuditWriter

__all__ = [
    "AuditError",
    "AuditRecordError",
    "AuditStats",
    "AuditWriter",
    "CanonicalError",
    "SigningKey",
    "canonical",
    "default_public_keys",
    "load_or_create_signing_key",
    "load_public_keys",
    "rotate_key",
]
