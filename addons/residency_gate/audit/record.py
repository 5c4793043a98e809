"""The one builder of audit record fields: decision, outcome and config records.

Every record the proxy writes is shaped here, and `record.schema.json` beside
this file says what each kind holds (tests validate built records against it).
Records hold digests and identifiers, never prompts, responses or credentials:
the URL has no query string, body values are only the short ones a locator read.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from functools import cache
from importlib import resources
from typing import Any

from ..core.decision import REROUTE, Decision
from ..core.places import RegionTree
from ..core.request import Request


@dataclass(frozen=True)
class BodyDigest:
    sha256: str
    length: int


def decision_fields(decision: Decision, req: Request, regions: RegionTree,
                    revisions: dict[str, str], digest: BodyDigest | None = None
                    ) -> dict[str, Any]:
    """The fields of a `decision` record (the writer adds v/origin/seq/ts/prev/id/sig).

    `inputs` with `tags`, `client`, `user`, `method` and `url` are everything the decision
    read except the body's bytes: `audit replay` rebuilds the request from them."""
    names = regions.region_list
    loc = decision.location
    requirement = decision.requirement
    fields: dict[str, Any] = {
        "client": req.client_ip,
        "user": req.user,
        "method": req.method,
        "url": decision.url,
        "host": decision.host,
        "tags": list(req.tag_values),
        "provider": decision.provider,
        "endpoint": decision.endpoint_id,
        "model": decision.model,
        "decision": decision.verdict,
        "enforced": decision.enforced,
        "status": decision.status,
        "code": str(decision.code),
        "reason": decision.reason,
        "requirement": list(requirement.names),
        "requirement_places": names(requirement.places),
        "requirement_sources": [{"source": p.source, "detail": p.detail, "names": list(p.names),
                                 "mode": p.mode} for p in requirement.parts],
        "places": names(loc.places) if loc else None,
        "processing": names(loc.processing) if loc else None,
        "storage": names(loc.storage) if loc else None,
        "located_by": loc.detail if loc else None,
        "advice": list(decision.advice),
        "inputs": {"path": _path_of(decision.url), "signed": req.signed,
                   "reads": dict(decision.reads)},
        "revisions": dict(revisions),
        "body_sha256": digest.sha256 if digest else None,
        "body_bytes": digest.length if digest else None,
    }
    route = decision.route
    if route is not None and decision.verdict == REROUTE:
        fields.update({"routed_to": route.host, "routed_url": route.url,
                       "routed_places": names(route.location.places),
                       "route": route.description})
    return fields


def _path_of(url: str) -> str:
    rest = url.split("://", 1)[-1]
    slash = rest.find("/")
    return rest[slash:] if slash >= 0 else "/"


def outcome_fields(decision_id: str, status: int | None, bytes_in: int, bytes_out: int | None,
                   duration_ms: int, error: str | None,
                   error_kind: str | None = None) -> dict[str, Any]:
    """The fields of an `outcome` record: what happened after the decision."""
    return {"decision_id": decision_id, "status": status, "bytes_in": bytes_in,
            "bytes_out": bytes_out, "duration_ms": duration_ms, "error": error,
            "error_kind": error_kind}


def inventory_fields(window_start: datetime, window_seconds: int, client: str | None,
                     user: str | None, provider: str, endpoint: str, host: str,
                     sni: str | None, requirement: tuple[str, ...],
                     requirement_places: tuple[str, ...] | None, connections: int,
                     bytes_up: int, bytes_down: int, duration_ms: int,
                     would_block: int) -> dict[str, Any]:
    """The fields of an `inventory` record: tunnelled connections to one AI service (not
    intercepted: metadata only) from one client and user, in one window."""
    return {"window_start": window_start.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
            "window_seconds": window_seconds, "client": client, "user": user,
            "provider": provider, "endpoint": endpoint, "host": host, "sni": sni,
            "requirement": list(requirement),
            "requirement_places": None if requirement_places is None
            else list(requirement_places),
            "connections": connections, "bytes_up": bytes_up, "bytes_down": bytes_down,
            "duration_ms": duration_ms, "would_block": would_block}


def config_fields(revisions: dict[str, str], config_file: str | None, catalog_files: list[str],
                  reason: str) -> dict[str, Any]:
    """The fields of a `config` record: which config and catalog decide from now on."""
    return {"revisions": dict(revisions), "config_file": config_file,
            "catalog_files": list(catalog_files), "reason": reason}


@cache
def record_schema() -> dict[str, Any]:
    text = resources.files("residency_gate.audit").joinpath("record.schema.json").read_text()
    return json.loads(text)
