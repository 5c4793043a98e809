"""Human rendering of a decision, for `residency-gate explain`."""

from __future__ import annotations

import textwrap

from .engine import Decision, RequestInfo
from .policy import Policy


def render_text(policy: Policy, req: RequestInfo, decision: Decision) -> str:
    describe = policy.regions.describe
    lines = [f"Request:      {req.method} {decision.url}"]
    if decision.provider is None:
        lines.append(f"Destination:  {decision.host}: not an LLM API in the catalog; "
                     "tunnelled untouched")
        return "\n".join(lines)
    lines.append(f"Destination:  {decision.provider_name}: {decision.endpoint_name} "
                 f"({decision.provider}/{decision.endpoint})")
    if decision.model:
        lines.append(f"Model:        {decision.model}")
    loc = decision.location
    if loc is not None:
        lines.append(f"Processed in: {describe(loc.processing)}")
        lines.append(f"Stored in:    {describe(loc.storage)}")
        lines.append(f"Because:      {loc.detail}")
    req_ = decision.requirement
    if req_.places is None:
        lines.append("Requirement:  none")
    else:
        lines.append(f"Requirement:  {describe(req_.places)}")
        for part in req_.parts:
            lines.append(f"  from {part.detail}: {'+'.join(part.names)}")
    verdict = decision.verdict.upper()
    if decision.status:
        verdict += f" (HTTP {decision.status})"
    lines.append(f"Decision:     {verdict}")
    lines.extend(textwrap.wrap(decision.reason, width=88, initial_indent="  ",
                               subsequent_indent="  "))
    if decision.verdict == "block" and decision.options:
        lines.append("Compliant alternatives:")
        lines.extend(f"  - {o.advice}  [{describe(o.places)}]" for o in decision.options[:12])
        if len(decision.options) > 12:
            lines.append(f"  ... and {len(decision.options) - 12} more")
    return "\n".join(lines)
