"""residency-gate inside an existing mitmproxy (`mitmdump -s addons/mitmdump_addon.py`).

Same addon as `residency-gate run`; here mitmproxy owns the options, so the
config file comes in through the typed option `residency_config` and is
validated in `configure` (an invalid one raises OptionsError: mitmproxy refuses
to start, or keeps the old value on a live `--set`).
"""

from __future__ import annotations

import logging

from mitmproxy import ctx, exceptions

from ..audit.open import open_audit
from ..audit.record import config_fields
from ..catalog.bundle import load_bundle
from ..catalog.source import InvalidSource
from .addon import ResidencyGate
from .interface import Gate

log = logging.getLogger("residency_gate")


class MitmdumpResidencyGate(ResidencyGate):
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
            bundle = load_bundle(ctx.options.residency_config or None)
        except InvalidSource as e:
            raise exceptions.OptionsError(f"invalid residency-gate config:\n{e}") from None
        first = self.gate is None
        if first:
            audit = open_audit(bundle.config.audit, bundle.config.certs_dir)
            self.gate = Gate(bundle=bundle, audit=audit)
        else:
            self.gate.bundle = bundle
        fields = config_fields(bundle.revisions,
                               str(bundle.config.path) if bundle.config.path else None,
                               bundle.catalog.files, "start" if first else "reload")
        if first:
            self._pending_config = fields  # written once the event loop runs
        else:
            self.gate.spawn(self._write_config_record(fields))
        if ctx.options.connection_strategy != "lazy":
            log.warning("residency-gate: set connection_strategy=lazy so refused requests "
                        "never open a connection to the provider")

    async def running(self) -> None:
        fields, self._pending_config = getattr(self, "_pending_config", None), None
        if fields is not None:
            await self._write_config_record(fields)

    async def _write_config_record(self, fields: dict) -> None:
        if self.gate is not None:
            try:
                await self.gate.audit.append("config", fields)
            except Exception as e:
                log.critical("cannot write the config record: %s", e)

    async def done(self) -> None:
        if self.gate is not None:
            await self.gate.audit.close()
