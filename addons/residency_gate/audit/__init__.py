"""The signed, hash-chained audit trail (writer, verifier, CLI)."""

from .canonical import CanonicalError, canonical
from .keys import (
    SigningKey,
    default_public_keys,
    load_or_create_signing_key,
    load_public_keys,
    rotate_key,
)
from .writer import AuditWriter
from .writer_api import AuditError, AuditRecordError, AuditStats, WriterSettings

__all__ = [
    "AuditError",
    "AuditRecordError",
    "AuditStats",
    "AuditWriter",
    "CanonicalError",
    "SigningKey",
    "WriterSettings",
    "canonical",
    "default_public_keys",
    "load_or_create_signing_key",
    "load_public_keys",
    "rotate_key",
]
