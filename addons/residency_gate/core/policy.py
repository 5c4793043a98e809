"""The operator's policy, compiled: requirements, what to do on a violation, and the
alternatives (options, private endpoints, Azure resources) a decision may offer.

Data (the catalog) says where providers process; policy (this) says where
requests may go; `decision.decide` compares the two for one request.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from .endpoints import Endpoint
from .locate import Option
from .places import Places
from .request import AzureResource
from .requirement import Requirements
from .strict_json import JSON_DEPTH


@dataclass(frozen=True)
class PrivateEndpoint:
    """An OpenAI-compatible server inside the perimeter (config `private_endpoints`)."""

    name: str
    scheme: str
    host: str
    port: int
    path: str  # base path, no trailing slash (e.g. /v1)
    api: str
    places: Places
    models: Mapping[str, str]  # requested -> served; "*" matches any
    api_key_env: str | None

    def serves(self, model: str | None) -> str | None:
        """The model this endpoint serves for `model`, or None."""
        served = self.models.get(model or "", self.models.get("*"))
        return model if served == "*" else served


@dataclass
class Policy:
    requirements: Requirements
    on_violation: str = "block"  # block | reroute
    azure: dict[str, AzureResource] = field(default_factory=dict)
    azure_keys: dict[str, str] = field(default_factory=dict)  # resource -> api_key_env
    reroute_keys: dict[str, str] = field(default_factory=dict)  # target host -> api_key_env
    private: tuple[PrivateEndpoint, ...] = ()
    options: dict[str, list[Option]] = field(default_factory=dict)  # by endpoint key
    env_present: frozenset[str] = frozenset()  # key variables set when this policy loaded
    json_depth: int = JSON_DEPTH  # limits.json_depth: deeper bodies cannot be classified
    _advice_cache: dict = field(default_factory=dict, repr=False)

    @property
    def header(self) -> str:
        return self.requirements.header

    def compliant_options(self, endpoint: Endpoint, requirement: Places) -> list[Option]:
        """Alternatives for this provider that satisfy the requirement, best first."""
        key = (endpoint.key, requirement)
        cached = self._advice_cache.get(key)
        if cached is None:
            keys = [endpoint.key, *(f"{endpoint.provider.id}/{t}" for t in endpoint.reroute.to)]
            cached = [o for k in keys for o in self.options.get(k, ()) if o.places <= requirement]
            # The broadest compliant place first: fewest constraints for the application.
            cached.sort(key=lambda o: (o.endpoint is not endpoint, -len(o.places), o.value or ""))
            if len(self._advice_cache) > 4096:
                self._advice_cache.clear()
            self._advice_cache[key] = cached
        return cached
