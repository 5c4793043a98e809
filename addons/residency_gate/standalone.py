"""residency-gate inside an existing mitmproxy (`mitmdump -s addons/mitmdump_addon.py`).

Same addon as `residency-gate run`; here mitmproxy owns the options, so the
config file comes in through the typed option `residency_config` and is
validated in `configure` (an invalid one raises OptionsError: mitmproxy refuses
to start, or keeps the old value on a live `--set`).
"""

from __future__ import annotations

import logging

from mitmproxy import ctx, exceptions

from .addon import Gate, ResidencyGate
from .ops.metrics import METRICS
from .ops.run import open_audit
from .policy import load_policy
from .sourcefile import InvalidSource

log = logging.getLogger("residency_gate")


class StandaloneResidencyGate(ResidencyGate):
    def load(self, loader) -> None:
        loader.add_option(
            "residency_config", str, "",
            "residency-gate config file (YAML). Empty: ./residency-gate.yaml if present, "
            "else the built-in defaults.",
        )

    def configure(self, updated: set[str]) -> None:
        if "residency_config" not in updated and self.gate is not None:
            return
        try:
            policy = load_policy(ctx.options.residency_config or None)
        except InvalidSource as e:
            raise exceptions.OptionsError(f"invalid residency-gate config:\n{e}") from None
        if self.gate is None:
            self.gate = Gate(policy=policy, audit=open_audit(policy), metrics=METRICS)
        else:
            self.gate.policy = policy
        if ctx.options.connection_strategy != "lazy":
            log.warning("residency-gate: set connection_strategy=lazy so refused requests "
                        "never open a connection to the provider")

    async def done(self) -> None:
        if self.gate is not None:
            await self.gate.audit.close()
