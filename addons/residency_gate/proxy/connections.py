"""Connection-level hooks: which TLS to intercept, raw streams, and `resolve`.

  tls_clienthello  -> intercept catalog hosts (by CONNECT target or SNI); TLS to an
                      IP-literal CONNECT target as `ip_literals` says; a ClientHello that
                      hides its name (ECH) to an address known to serve a catalog host;
                      tunnel the rest
  tcp_start        -> raw (non-HTTP) streams to an LLM host are killed, never relayed
  server_connect   -> connect where `resolve` says, SNI and certificate still on the host name
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Iterable

from mitmproxy import connection, tcp, tls
from mitmproxy.proxy import mode_specs, server_hooks

from ..catalog.bundle import Bundle
from ..core.admission import is_ip
from .interface import GateHolder

log = logging.getLogger("residency_gate")

# Modes whose client names its target (a CONNECT or SOCKS5 request): an IP address there
# is the client's choice, and `ip_literals` applies. Elsewhere (transparent, wireguard,
# local) the target is the packet's own destination and the ClientHello names the host.
NAMED_TARGET_MODES = (mode_specs.RegularMode, mode_specs.UpstreamMode, mode_specs.Socks5Mode)
# encrypted_client_hello (RFC 9849 draft-ietf-tls-esni) and the older encrypted_server_name
HIDDEN_NAME_EXTENSIONS = frozenset({0xFE0D, 0xFFCE})


def hides_name(client_hello: tls.ClientHello) -> bool:
    """Does the ClientHello carry ECH? Its real server name is then encrypted. (GREASE ECH,
    which browsers send on every connection, looks the same by design.)"""
    return any(kind in HIDDEN_NAME_EXTENSIONS for kind, _ in client_hello.extensions)


class KnownAddresses:
    """Addresses known to serve a catalog host: DNS answers the proxy got for catalog names
    (transparent mode checks every intercepted name in DNS) and peers of its own LLM
    connections (`resolve` targets are read from the config). Bounded; entries expire."""

    def __init__(self, limit: int = 4096, ttl: float = 3600.0) -> None:
        self.limit = limit
        self.ttl = ttl
        self._until: OrderedDict[str, float] = OrderedDict()

    def learn(self, addresses: Iterable[str]) -> None:
        until = time.monotonic() + self.ttl
        for address in addresses:
            self._until[address] = until
            self._until.move_to_end(address)
        while len(self._until) > self.limit:
            self._until.popitem(last=False)

    def __contains__(self, address: str) -> bool:
        until = self._until.get(address)
        return until is not None and until > time.monotonic()


class Interception:
    """Intercept LLM hosts only; everything else keeps its own TLS, untouched."""

    def __init__(self, owner: GateHolder) -> None:
        self.owner = owner  # the gate is swapped in later under mitmdump
        self.llm_addresses = KnownAddresses()
        self.refused: set[str] = set()  # client connections `ip_literals: refuse` refuses
        self._resolve_targets: tuple[object, frozenset[str]] = (None, frozenset())

    @property
    def gate(self):
        return self.owner.gate

    def client_connected(self, client: connection.Client) -> None:
        if self.gate is not None and self.gate.metrics:
            self.gate.metrics.open_connections.inc()

    def client_disconnected(self, client: connection.Client) -> None:
        self.refused.discard(client.id)
        if self.gate is not None and self.gate.metrics:
            self.gate.metrics.open_connections.dec()

    def tls_clienthello(self, data: tls.ClientHelloData) -> None:
        """Intercept what may be an LLM request; tunnel the rest (see the module docstring)."""
        try:
            action = self.classify(data)
        except Exception:
            log.exception("cannot classify TLS connection; intercepting it (fail closed)")
            action = "intercept"
        if action == "refuse":
            self.refused.add(data.context.client.id)
        data.ignore_connection = action == "tunnel"
        if self.gate is not None and self.gate.metrics:
            self.gate.metrics.flows.labels(
                kind="tunnelled" if data.ignore_connection else "intercepted").inc()

    def classify(self, data: tls.ClientHelloData) -> str:
        """intercept | refuse (intercept, then refuse every request) | tunnel."""
        bundle: Bundle = self.gate.bundle
        catalog = bundle.catalog
        target = data.context.server.address[0] if data.context.server.address else ""
        sni = data.client_hello.sni or ""
        if catalog.is_llm(target) or catalog.is_llm(sni):
            return "intercept"
        if not is_ip(target):
            return "tunnel"  # the proxy connects to that name, which is not an LLM host
        if isinstance(data.context.client.proxy_mode, NAMED_TARGET_MODES):
            # An address chosen by the client names no host: what is inside decides.
            return {"inspect": "intercept", "refuse": "refuse"}.get(bundle.config.ip_literals,
                                                                     "tunnel")
        if hides_name(data.client_hello) and self.serves_llm(target, bundle):
            log.info("TLS to %s hides its server name (ECH) and that address serves an LLM "
                     "API: intercepted, ECH not honoured", target)
            return "intercept"
        return "tunnel"

    def serves_llm(self, address: str, bundle: Bundle) -> bool:
        """Is `address` known to serve a catalog host (intercept-eligible)?"""
        config, targets = self._resolve_targets
        if config is not bundle.config:
            targets = frozenset(ip for name, (ip, _) in bundle.config.resolve.items()
                                if bundle.catalog.is_llm(name.rsplit(":", 1)[0]))
            self._resolve_targets = (bundle.config, targets)
        return address in targets or address in self.llm_addresses

    def server_connected(self, data: server_hooks.ServerConnectionHookData) -> None:
        """The address of every upstream LLM connection is an LLM address."""
        try:
            catalog = self.gate.bundle.catalog
            names = (data.server.sni or "", data.server.address[0] if data.server.address else "")
            if data.server.peername and any(catalog.is_llm(n) for n in names):
                self.llm_addresses.learn((data.server.peername[0],))
        except Exception:
            log.exception("cannot note an LLM address")

    def tcp_start(self, flow: tcp.TCPFlow) -> None:
        """Non-HTTP bytes inside an intercepted LLM tunnel (or a refused IP-literal one)
        would be relayed undecided: kill."""
        try:
            catalog = self.gate.bundle.catalog
            names = (flow.server_conn.address[0] if flow.server_conn.address else "",
                     flow.client_conn.sni or "")
            if flow.client_conn.id not in self.refused and \
                    not any(catalog.is_llm(n) for n in names):
                return
        except Exception:
            log.exception("cannot classify a raw TCP flow; killing it (fail closed)")
        log.warning("refused a non-HTTP stream to %s (only HTTP is decided on)",
                    flow.server_conn.address)
        flow.kill()


class Resolve:
    """`resolve`: connect elsewhere (private links, split DNS, tests), keep SNI and
    certificate checks on the name."""

    def __init__(self, owner: GateHolder) -> None:
        self.owner = owner
        self._resolved: dict[str, tuple] = {}  # server connection id -> name it was opened for

    @property
    def gate(self):
        return self.owner.gate

    def server_connect(self, data: server_hooks.ServerConnectionHookData) -> None:
        if not data.server.address or self.gate is None:
            return
        host, port = data.server.address[0], data.server.address[1]
        resolve = self.gate.bundle.config.resolve
        target = resolve.get(f"{host.lower()}:{port}") or resolve.get(host.lower().rstrip("."))
        if target:
            if data.server.sni is None and not is_ip(host):
                data.server.sni = host
            self._resolved[data.server.id] = data.server.address
            data.server.address = target

    def server_connected(self, data: server_hooks.ServerConnectionHookData) -> None:
        """Give a resolved connection its name back: mitmproxy reuses upstream connections
        by address, and caps them at 5 per address, so a connection left under the IP is
        never reused and a keep-alive client stalls on its 6th request."""
        original = self._resolved.pop(data.server.id, None)
        if original is not None:
            # mitmproxy refuses address changes on open connections (to keep reuse honest);
            # the name this connection was opened for is the honest key, so set it directly.
            object.__setattr__(data.server, "address", original)

    def server_connect_error(self, data: server_hooks.ServerConnectionHookData) -> None:
        self._resolved.pop(data.server.id, None)
