"""Fixtures for the unit tests."""

from __future__ import annotations

import pytest

from residency_gate.audit.keys import load_or_create_signing_key


@pytest.fixture
def certs(tmp_path):
    """A certs dir for an audit signing key (created by `key`)."""
    return tmp_path / "certs"


@pytest.fixture
def key(certs):
    return load_or_create_signing_key(certs)
