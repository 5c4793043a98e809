"""Where the shipped catalog is: package data, found the way an installed package finds it."""

from __future__ import annotations

from importlib import resources
from pathlib import Path


def shipped_dir() -> Path:
    """The shipped catalog directory (regions.yaml, apis.yaml, providers/, schema/)."""
    return Path(str(resources.files("residency_gate.catalog_data")))


def schema_dir() -> Path:
    return shipped_dir() / "schema"
