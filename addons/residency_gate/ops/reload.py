"""Hot reload: SIGHUP or a changed file swaps in a new bundle; a bad one is refused.

Loading happens in a worker thread (file I/O, schema validation); the swap is a
single assignment on the event loop, so a request sees either the old bundle or
the new one, never a mix. Open connections are not touched.

A reload that fails for any reason (invalid files, an unexpected error, or no result
within LOAD_TIMEOUT) keeps the old bundle, logs why and counts an error in
`residency_gate_config_reloads_total{result="error"}`. Reading is bounded
(`catalog.source`), so the timeout is a last line; a load still running in its thread
is never started twice.
"""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path

from ..audit.record import config_fields
from ..catalog.bundle import load_bundle
from ..catalog.freshness import oldest_by_provider
from ..catalog.source import InvalidSource

log = logging.getLogger("residency_gate.reload")

LOAD_TIMEOUT = 30.0  # seconds for one config + catalog load

# Keys a running proxy cannot change: they need a restart.
RESTART_ONLY = ("listen", "mode", "admin", "certs_dir", "proxy_auth", "upstream_ca", "audit",
                "workers")


class Reloader:
    def __init__(self, gate, config_arg: str | None, metrics, interval: float = 1.0,
                 on_swap=None) -> None:
        self.gate = gate
        self.on_swap = on_swap  # called with the new bundle (mitmproxy options that follow it)
        self.config_arg = config_arg
        self.metrics = metrics
        self.interval = interval
        self._task: asyncio.Task | None = None
        self._wake = asyncio.Event()
        self._stamps = self._snapshot()
        self._loading: asyncio.Future | None = None  # a load still running in its thread

    def _files(self) -> list[Path]:
        bundle = self.gate.bundle
        files = [Path(f) for f in bundle.catalog.files]
        if bundle.config.path is not None:
            files.append(Path(bundle.config.path))
        # directories: a new provider file changes their mtime (also of a dir still empty)
        dirs = {f.parent for f in files} | {Path(d) for d in bundle.catalog.dirs}
        return files + sorted(dirs)

    def _snapshot(self) -> dict[str, float]:
        stamps = {}
        for f in self._files():
            try:
                st = os.stat(f)
                stamps[str(f)] = (st.st_mtime_ns, st.st_size)
            except OSError:
                stamps[str(f)] = None
        return stamps

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._watch())

    def stop(self) -> None:
        if self._task:
            self._task.cancel()

    def trigger(self) -> None:
        """SIGHUP: reload now."""
        self._stamps = {}
        self._wake.set()

    async def _watch(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), self.interval)
            except TimeoutError:
                pass
            self._wake.clear()
            stamps = await loop.run_in_executor(None, self._snapshot)
            if stamps != self._stamps:
                self._stamps = stamps
                await self.reload()

    async def reload(self) -> bool:
        loop = asyncio.get_running_loop()
        old = self.gate.bundle
        if self._loading is not None and not self._loading.done():
            return self._refused("a previous reload is still loading (stuck?)")
        self._loading = loop.run_in_executor(None, load_bundle, self.config_arg)
        self._loading.add_done_callback(lambda f: f.cancelled() or f.exception())  # retrieved
        try:
            new = await asyncio.wait_for(asyncio.shield(self._loading), LOAD_TIMEOUT)
        except InvalidSource as e:
            return self._refused(f"\n{e}")
        except TimeoutError:
            return self._refused(f"not loaded within {LOAD_TIMEOUT:g}s")
        except Exception as e:
            log.exception("reload failed, the previous config and catalog keep serving: %s", e)
            self.metrics.reload_result(False)
            return False
        for key in RESTART_ONLY:
            if getattr(old.config, key, None) != getattr(new.config, key, None):
                log.warning("config key %r changed: takes effect after a restart", key)
        if new.revisions != old.revisions:
            await self._record(new)  # first in the chain, then deciding under it
        self.gate.bundle = new
        if self.on_swap is not None:
            try:
                self.on_swap(new)
            except Exception as e:
                log.error("reloaded, but mitmproxy refused the new options: %s", e)
        self.metrics.set_catalog_version(new.catalog.revision)
        self.metrics.set_review_ages(oldest_by_provider(new.catalog))
        self.metrics.reload_result(True)
        log.info("reloaded config %s and catalog %s", new.config.revision, new.catalog.revision)
        self._stamps = await loop.run_in_executor(None, self._snapshot)
        return True

    def _refused(self, why: str) -> bool:
        log.error("reload refused, the previous config and catalog keep serving: %s", why)
        self.metrics.reload_result(False)
        return False

    async def _record(self, bundle) -> None:
        """A `config` record in the chain: decisions after it name these revisions."""
        try:
            async with asyncio.timeout(bundle.config.decision_timeout):
                await self.gate.audit.append("config", config_fields(
                    bundle.revisions, str(bundle.config.path) if bundle.config.path else None,
                    bundle.catalog.files, "reload"))
        except Exception as e:
            log.critical("cannot record the reloaded config: %s", e)
