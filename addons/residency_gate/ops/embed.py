"""mitmproxy, embedded: which of its addons the gate carries and which options it sets.

mitmdump dispatches every hook through ~34 addons (playback, save, export, map
local, sticky cookies, ...). A residency gate needs only the ones that make a
proxy: listening and modes, CONNECT and TLS, proxy auth, DNS and upstream auth.
Fewer addons, less CPU per request; the options the config maps to are all
defined by the addons kept (a test checks each one still works).
"""

from __future__ import annotations

import asyncio
import math
from pathlib import Path

import certifi
from mitmproxy import exceptions
from mitmproxy.addons import (
    block,
    core,
    disable_h2c,
    dns_resolver,
    errorcheck,
    next_layer,
    proxyauth,
    proxyserver,
    strip_dns_https_records,
    tlsconfig,
    upstream_auth,
)
from mitmproxy.master import Master
from mitmproxy.options import Options

from ..catalog.bundle import Bundle
from ..catalog.config import Limits
from . import dispatch

CA_CERT = "mitmproxy-ca-cert.pem"


def gate_addons() -> list[object]:
    """The mitmproxy addons a residency gate needs, in mitmproxy's own order."""
    return [core.Core(), block.Block(), disable_h2c.DisableH2C(), proxyauth.ProxyAuth(),
            proxyserver.Proxyserver(), dns_resolver.DnsResolver(),
            # Where mitmproxy answers DNS (wireguard, local modes), ECH configs are removed
            # from HTTPS records (`strip_ech`): clients then send their real server name.
            strip_dns_https_records.StripDnsHttpsRecords(), next_layer.NextLayer(),
            tlsconfig.TlsConfig(), upstream_auth.UpstreamAuth(), errorcheck.ErrorCheck()]


def upstream_trust_bundle(bundle: Bundle, write: bool = True) -> Path | None:
    """mitmproxy's trusted-CA option replaces the default roots; we add to them instead."""
    extra = bundle.config.upstream_ca
    if extra is None:
        return None
    path = bundle.config.certs_dir / "upstream-trust.pem"
    data = Path(certifi.where()).read_bytes() + b"\n" + extra.read_bytes()
    if write and (not path.exists() or path.read_bytes() != data):
        path.write_bytes(data)
    return path


def mitmproxy_options(bundle: Bundle, write: bool = True) -> dict:
    """The config, as mitmproxy options."""
    config = bundle.config
    opts: dict = {
        "listen_host": config.listen[0],
        "listen_port": config.listen[1],
        "mode": [config.mode],
        "confdir": str(config.certs_dir),
        # Lazy: no upstream connection before our decision, so a refused request
        # never even opens a TCP/TLS connection to the provider.
        "connection_strategy": "lazy",
        **limit_options(config.limits),
    }
    trust = upstream_trust_bundle(bundle, write)
    if trust is not None:
        opts["ssl_verify_upstream_trusted_ca"] = str(trust)
    if config.proxy_auth:
        opts["proxyauth"] = config.proxy_auth
    return opts


def limit_options(limits: Limits) -> dict:
    """The limits mitmproxy enforces itself. `tcp_timeout` closes a connection with no
    traffic either way; it must not cut a provider the gate is still waiting on, so it is
    at least the longest upstream wait (proxy/limits.py enforces those, and the rest)."""
    longest = max(limits.tunnel_idle_seconds, limits.upstream_first_byte_seconds,
                  limits.upstream_idle_seconds)
    return {"tcp_timeout": math.ceil(longest) + 1}


def gate_master(*addons: object) -> Master:
    """A mitmproxy master with only the gate's addons (call inside a running loop)."""
    master = Master(Options(), with_termlog=False)
    dispatch.install(master)  # hook handlers looked up once per hook name (ops/dispatch.py)
    master.addons.add(*gate_addons())
    master.addons.add(*addons)
    return master


def option_problems(bundle: Bundle) -> list[str]:
    """What mitmproxy itself says of the options the config maps to (mode specs, proxy
    auth specs, ...), so `check` refuses what `run` would refuse. No files are written:
    the CA directory is left out (`run` creates the CA there)."""

    async def validate() -> list[str]:
        master = gate_master()
        opts = mitmproxy_options(bundle, write=False)
        opts.pop("confdir")
        opts.pop("ssl_verify_upstream_trusted_ca", None)
        try:
            master.options.update(**opts)
        except exceptions.OptionsError as e:
            return [str(e)]
        return []

    return asyncio.run(validate())
