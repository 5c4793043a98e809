"""Connection-level hooks: who may connect, which TLS to intercept, raw streams, `resolve`.

  client_connected -> only loopback and access.clients may use the proxy
  http_connect     -> CONNECT only to access.connect_ports (403 otherwise)
  tls_clienthello  -> intercept catalog hosts (by CONNECT target or SNI); TLS to an
                      IP-literal CONNECT target as `ip_literals` says; a ClientHello that
                      hides its name (ECH) to an address known to serve a catalog host;
                      tunnel the rest
  next_layer       -> a stream to an LLM host is parsed as HTTP, never relayed as raw TCP
  tcp_start        -> raw (non-HTTP) streams to an LLM host are killed, never relayed
  server_connect   -> connect where `resolve` says, SNI and certificate still on the host name
"""

from __future__ import annotations

import ipaddress
import logging
import time
from collections import OrderedDict
from collections.abc import Iterable

from mitmproxy import connection, http, tcp, tls
from mitmproxy.proxy import layer, layers, mode_specs, server_hooks
from mitmproxy.proxy.layers.http import HTTPMode

from ..catalog.bundle import Bundle
from ..core import wording
from ..core.admission import is_ip
from ..core.endpoints import normalise_host
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


class Access:
    """Not an open relay: clients outside `access.clients` are disconnected before they
    send anything, and CONNECT reaches only `access.connect_ports` (Squid's SSL_ports).
    Reads the bundle in force, so both follow a reload."""

    LOG_EVERY_SECONDS = 60.0  # per client address: a scanner must not flood the log
    LOG_MEMORY = 1024  # addresses remembered for that

    def __init__(self, owner: GateHolder) -> None:
        self.owner = owner
        self._logged: dict[tuple[str, str], float] = {}

    def _refused(self, reason: str, address: str, line: str) -> None:
        """Count every refusal; log it once a minute per client address and reason."""
        gate = self.owner.gate
        if gate is not None and gate.metrics:
            gate.metrics.refused_connections.labels(reason=reason).inc()
        now, key = time.monotonic(), (reason, address)
        last = self._logged.get(key)
        if last is not None and now - last < self.LOG_EVERY_SECONDS:
            return
        if len(self._logged) >= self.LOG_MEMORY:
            self._logged.clear()
        self._logged[key] = now
        log.warning("%s", line)

    def client_connected(self, client: connection.Client) -> None:
        try:
            allowed = self.owner.gate.bundle.config.access.clients
            if not allowed or not client.peername:
                return  # no list, or no network peer (local redirect mode)
            address = ipaddress.ip_address(client.peername[0].split("%", 1)[0])
            if isinstance(address, ipaddress.IPv6Address):
                address = address.ipv4_mapped or address
            if address.is_loopback or any(address in net for net in allowed):
                return
            reason = wording.client_not_allowed(str(address))
        except Exception:
            log.exception("cannot check a client against access.clients; closing (fail closed)")
            reason = "access check failed"
        client.error = reason  # mitmproxy closes the connection at once
        self._refused("client", str(client.peername[0] if client.peername else "?"), reason)

    def http_connect(self, flow: http.HTTPFlow) -> None:
        if flow.response is not None:
            return  # already answered (proxyauth's 407)
        try:
            ports = self.owner.gate.bundle.config.access.connect_ports
            if flow.request.port in ports:
                return
            message = wording.connect_port_refused(flow.request.host, flow.request.port,
                                                   sorted(ports))
        except Exception:
            log.exception("cannot check a CONNECT against access.connect_ports; refusing it")
            message = wording.internal_error("checking the CONNECT target") + "\n"
        flow.response = http.Response.make(403, message, {"Content-Type": "text/plain"})
        peer = str(flow.client_conn.peername[0] if flow.client_conn.peername else "?")
        self._refused("connect_port", peer, f"refused CONNECT {flow.request.host}:"
                      f"{flow.request.port} from {peer} (access.connect_ports)")


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

    def next_layer(self, nextlayer: layer.NextLayer) -> None:
        """mitmproxy relays a stream it takes for non-HTTP as raw TCP (a first read of fewer
        than 3 bytes is enough); to an LLM host that would leave undecided. Parse it as
        HTTP instead: a real request is then decided like any other, garbage gets a 400."""
        lay = nextlayer.layer
        if not isinstance(lay, layers.TCPLayer) or lay.flow is None:
            return  # not raw TCP, or a tunnel to a non-LLM host (flow None: ignored)
        ctx = nextlayer.context
        try:
            catalog = self.gate.bundle.catalog
            llm = any(catalog.is_llm(n) for n in (
                ctx.server.address[0] if ctx.server.address else "", ctx.client.sni or ""))
        except Exception:
            log.exception("cannot classify a raw stream; parsing it as HTTP (fail closed)")
            llm = True
        if llm:
            ctx.layers.remove(lay)
            nextlayer.layer = layers.HttpLayer(ctx, HTTPMode.transparent)

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
        name = normalise_host(host)
        target = resolve.get(f"{name}:{port}") or resolve.get(name)
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
