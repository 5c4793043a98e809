"""`residency-gate explain`: a decision rendered for people, with its own evaluation trace."""

from __future__ import annotations

import textwrap

from .decision import BLOCK, Decision
from .places import RegionTree
from .request import Request


def render_text(regions: RegionTree, req: Request, decision: Decision) -> str:
    describe = regions.describe
    lines = [f"Request:      {req.method} {decision.url}"]
    if decision.target is not None:
        lines.append(f"Normalised:   from {req.path.partition('?')[0]} (servers act on the "
                     "normal form; the proxy forwards it)")
    endpoint = decision.endpoint
    if not decision.is_llm:
        lines.append(f"Destination:  {decision.host}: not an LLM API in the catalog; "
                     "tunnelled untouched")
        return "\n".join(lines)
    if endpoint is not None:
        lines.append(f"Destination:  {endpoint.provider.name}: {endpoint.name} ({endpoint.key})")
    else:
        lines.append(f"Destination:  {decision.host}")
    if decision.model:
        lines.append(f"Model:        {decision.model}")
    loc = decision.location
    if loc is not None:
        lines.append(f"Processed in: {describe(loc.processing)}")
        lines.append(f"Stored in:    {describe(loc.storage)}")
        lines.append(f"Because:      {loc.detail}")
    requirement = decision.requirement
    if requirement.places is None:
        lines.append("Requirement:  none")
    else:
        lines.append(f"Requirement:  {describe(requirement.places)}")
        for part in requirement.parts:
            mode = " (report mode)" if part.mode == "report" else ""
            lines.append(f"  from {part.detail}: {'+'.join(part.names)}{mode}")
    verdict = decision.verdict.upper()
    if decision.status:
        verdict += f" (HTTP {decision.status})"
    lines.append(f"Decision:     {verdict} [{decision.code}]")
    if not decision.enforced:
        lines.append("Mode:         REPORT: forwarded unchanged and recorded with enforced: "
                     "false (answered X-Residency-Decision: report)")
    lines.extend(textwrap.wrap(decision.reason, width=88, initial_indent="  ",
                               subsequent_indent="  "))
    if decision.verdict == BLOCK and decision.options:
        lines.append("Compliant alternatives:")
        lines.extend(f"  - {o.advice}  [{describe(o.places)}]" for o in decision.options[:12])
        if len(decision.options) > 12:
            lines.append(f"  ... and {len(decision.options) - 12} more")
    if decision.trace:
        lines.append("Evaluation:")
        lines.extend(f"  {i}. {step}" for i, step in enumerate(decision.trace, 1))
    return "\n".join(lines)
