"""Where a request to an endpoint is processed: one class per `locate.from` kind.

Each locator answers two questions from catalog data alone:
  locate(view, model) -> Location   where this request would be processed and stored
  options(endpoint, ctx) -> [Option] every way to send such a request somewhere else
                                     with this endpoint (host, location, prefix, ...),
                                     compiled once per load, for advice and reroutes
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar
from urllib.parse import unquote

from .extract import Extractor, first_match
from .places import AzureRegion, Places, RegionTree
from .request import AzureResource, RequestView

if TYPE_CHECKING:
    from .endpoints import Endpoint


@dataclass(frozen=True)
class Location:
    """Where one request may be processed and stored, and how we know."""

    processing: Places | None
    storage: Places | None
    detail: str

    @property
    def places(self) -> Places | None:
        """Every place the request may touch; None when any part is unknown."""
        if self.processing is None or self.storage is None:
            return None
        return self.processing | self.storage


@dataclass(frozen=True)
class PlaceSpec:
    processing: Places
    storage: Places

    def at(self, detail: str) -> Location:
        return Location(self.processing, self.storage, detail)

    @property
    def places(self) -> Places:
        return self.processing | self.storage


def unknown(detail: str) -> Location:
    return Location(None, None, detail)


@dataclass(frozen=True)
class Option:
    """A way to send the same request somewhere else with one endpoint."""

    endpoint: Endpoint
    kind: str  # host | model_prefix | location | body | azure
    value: str | None
    host: str | None
    places: Places
    advice: str  # imperative, for the application developer


@dataclass(frozen=True)
class OptionContext:
    """What option building may read besides the catalog: the operator's Azure resources."""

    regions: RegionTree
    azure: Mapping[str, AzureResource] = field(default_factory=dict)


def host_with(endpoint: Endpoint, capture: str, value: str) -> str | None:
    """The endpoint's host pattern with `{capture}` filled in, if one has it."""
    for pattern in endpoint.hosts:
        if f"{{{capture}}}" in pattern:
            host = pattern.replace(f"{{{capture}}}", value)
            if "{" not in host:
                return host
    return None


def exact_host(endpoint: Endpoint) -> str | None:
    return next((h for h in endpoint.hosts if "{" not in h), None)


class Locator:
    """Base: a locator is frozen catalog data plus the two questions above."""

    kind: ClassVar[str]

    def locate(self, view: RequestView, model: str | None) -> Location:
        raise NotImplementedError

    def options(self, endpoint: Endpoint, ctx: OptionContext) -> list[Option]:
        return []


@dataclass(frozen=True)
class ConstantLocator(Locator):
    kind: ClassVar[str] = "constant"
    spec: PlaceSpec

    def locate(self, view: RequestView, model: str | None) -> Location:
        return self.spec.at("fixed for this endpoint")

    def options(self, endpoint: Endpoint, ctx: OptionContext) -> list[Option]:
        host = exact_host(endpoint)
        return [Option(endpoint, "host", None, host, self.spec.places,
                       f"send it to https://{host} ({endpoint.name})")] if host else []


@dataclass(frozen=True)
class UnconfirmedLocator(Locator):
    kind: ClassVar[str] = "unconfirmed"

    def locate(self, view: RequestView, model: str | None) -> Location:
        return unknown("processing place unconfirmed (no primary source)")


@dataclass(frozen=True)
class RegionTable:
    """Region values a host label or path segment may carry: the catalog's own table,
    then the cloud's region list."""

    values: Mapping[str, PlaceSpec] = field(default_factory=dict)
    cloud: str | None = None
    cloud_regions: Mapping[str, Places] = field(default_factory=dict)

    def lookup(self, value: str, what: str) -> Location:
        value = value.lower()
        if value in self.values:
            return self.values[value].at(f"{what} {value!r}")
        if self.cloud and value in self.cloud_regions:
            places = self.cloud_regions[value]
            return Location(places, places, f"{what} {value!r} ({self.cloud} region)")
        return unknown(f"{what} {value!r} is not in the catalog")

    def single_regions(self, regions: RegionTree) -> dict[str, Places]:
        """Every value with its places; cloud multi-regions only where the table names them."""
        table = {k: v.places for k, v in self.values.items()}
        for region_id, places in self.cloud_regions.items():
            if f"{self.cloud}:{region_id}" not in regions.multi_regions:
                table.setdefault(region_id, places)
        return table


@dataclass(frozen=True)
class HostLocator(Locator):
    kind: ClassVar[str] = "host"
    capture: str
    table: RegionTable

    def locate(self, view: RequestView, model: str | None) -> Location:
        return self.table.lookup(view.captures[self.capture], "host")

    def options(self, endpoint: Endpoint, ctx: OptionContext) -> list[Option]:
        out = []
        for value, places in self.table.single_regions(ctx.regions).items():
            host = host_with(endpoint, self.capture, value)
            if host is not None:
                out.append(Option(endpoint, "host", value, host, places,
                                  f"send it to https://{host} ({endpoint.name})"))
        return out


@dataclass(frozen=True)
class PathLocator(Locator):
    """A location in the path (Vertex `locations/{location}`); when the host names one
    too, both must agree."""

    kind: ClassVar[str] = "path"
    pattern: re.Pattern[str]
    table: RegionTable
    host_capture: str | None = None

    def locate(self, view: RequestView, model: str | None) -> Location:
        m = self.pattern.search(view.path)
        if not m:
            return unknown("no location in the path")
        location = unquote(m.group(1)).lower()
        if self.host_capture and view.captures.get(self.host_capture, "").lower() != location:
            return unknown(f"host location {view.captures.get(self.host_capture)!r} and path "
                           f"location {location!r} disagree")
        return self.table.lookup(location, "location")

    def options(self, endpoint: Endpoint, ctx: OptionContext) -> list[Option]:
        if self.host_capture is None:
            return []  # a location belongs in the host as well: see the regional endpoints
        out = []
        for value, places in self.table.single_regions(ctx.regions).items():
            host = host_with(endpoint, self.host_capture, value)
            if host is not None:
                out.append(Option(endpoint, "location", value, host, places,
                                  f"use location {value!r} (https://{host}, path "
                                  f"locations/{value})"))
        return out

    def replace(self, path: str, new: str) -> str | None:
        """The path with its location replaced (a reroute moves host and path together)."""
        m = self.pattern.search(path)
        return None if not m else path[:m.start(1)] + new + path[m.end(1):]


@dataclass(frozen=True)
class ArnGrammar:
    """How a model ARN names its region and resource type (catalog `arn:`)."""

    regex: re.Pattern[str]
    types: tuple[str, ...]

    def parse(self, model_id: str) -> tuple[str, str, str] | None:
        """(region, resource type, model id) or None when the ARN does not parse."""
        m = self.regex.match(model_id)
        if not m:
            return None
        return m.group("region"), m.group("type"), m.group("id")


@dataclass(frozen=True)
class ModelPrefixLocator(Locator):
    """Geography prefixes on model IDs (Bedrock inference profiles), also inside ARNs;
    no prefix: the region the host (or the ARN) names."""

    kind: ClassVar[str] = "model_prefix"
    prefixes: Mapping[str, PlaceSpec]
    table: RegionTable
    host_capture: str | None = None
    arn: ArnGrammar | None = None

    def locate(self, view: RequestView, model: str | None) -> Location:
        home = view.captures.get(self.host_capture) if self.host_capture else None
        model_id = model or ""
        if self.arn is not None and model_id.startswith("arn:"):
            parsed = self.arn.parse(model_id)
            if parsed is None:
                return unknown(f"model ARN {model_id!r} is not understood")
            home, rtype, model_id = parsed
            if rtype not in self.arn.types:
                return unknown(f"model ARN of type {rtype!r}: its region cannot be known from "
                               "the request")
        lowered = model_id.lower()
        for prefix, spec in self.prefixes.items():
            if lowered.startswith(prefix):
                return spec.at(f"model ID prefix {prefix!r} (cross-region inference profile)")
        if home is None:
            return unknown("model has no known prefix and the host names no region")
        return self.table.lookup(home, "region")

    def options(self, endpoint: Endpoint, ctx: OptionContext) -> list[Option]:
        out = [Option(endpoint, "model_prefix", prefix, None, spec.places,
                      f"use a model ID with the {prefix!r} prefix (cross-region inference "
                      "profile)") for prefix, spec in self.prefixes.items()]
        if self.host_capture:
            for region_id, places in self.table.single_regions(ctx.regions).items():
                host = host_with(endpoint, self.host_capture, region_id)
                if host:
                    out.append(Option(endpoint, "host", region_id, host, places,
                                      f"call region {region_id} (https://{host}) with a model "
                                      "ID that has no geography prefix"))
        return out


@dataclass(frozen=True)
class BodyLocator(Locator):
    """A body field names the place (Anthropic `inference_geo`), on some paths only."""

    kind: ClassVar[str] = "body"
    field: tuple[str, ...]
    values: Mapping[str, PlaceSpec]
    default: PlaceSpec
    paths: tuple[str, ...] = ()

    @property
    def field_name(self) -> str:
        return ".".join(self.field)

    def locate(self, view: RequestView, model: str | None) -> Location:
        name = self.field_name
        if self.paths and not view.path.startswith(self.paths):
            return self.default.at(f"path has no {name!r} field")
        value = view.body_value(self.field)
        if value is None:
            return self.default.at(f"body field {name!r} absent (default)")
        if not isinstance(value, str) or value.lower() not in self.values:
            return unknown(f"body field {name!r} = {value!r} is not known")
        return self.values[value.lower()].at(f"body field {name!r} = {value!r}")

    def options(self, endpoint: Endpoint, ctx: OptionContext) -> list[Option]:
        return [Option(endpoint, "body", value, None, spec.places,
                       f'set "{self.field_name}": "{value}" in the request body')
                for value, spec in self.values.items()]


# Where an Azure deployment type may run, as `deployment_types` in the catalog says.
AZURE_SCOPES = ("anywhere", "data_zone", "geography")


@dataclass(frozen=True)
class AzureLocator(Locator):
    """The operator's resource declaration (region, deployment type) decides."""

    kind: ClassVar[str] = "azure"
    capture: str
    deployment: tuple[Extractor, ...]
    deployment_types: Mapping[str, str]  # type -> anywhere | data_zone | geography
    azure_regions: Mapping[str, AzureRegion]
    everywhere: Places

    def scope(self, region: AzureRegion, dtype: str) -> Places | None:
        """Processing places of a deployment type in a region; None when unknown."""
        scope = self.deployment_types.get(dtype)
        if scope == "anywhere":
            return self.everywhere
        if scope == "data_zone":
            return region.data_zone
        if scope == "geography":
            return region.geography
        return None

    def locate(self, view: RequestView, model: str | None) -> Location:
        resource_name = view.captures[self.capture].lower()
        resource = view.azure.get(resource_name)
        if resource is None:
            return unknown(f"Azure resource {resource_name!r} is not declared in azure.resources")
        region = self.azure_regions.get(resource.region.lower())
        if region is None:
            return unknown(f"Azure region {resource.region!r} is not in the catalog")
        deployment = first_match(self.deployment, view)
        if deployment is None:
            return unknown(f"no deployment named in the request to Azure resource "
                           f"{resource_name!r}")
        dtype = resource.deployments.get(deployment)
        what = f"Azure resource {resource_name!r} ({resource.region}), deployment {deployment!r}"
        if dtype is None:
            return unknown(f"{what} is not declared in azure.resources")
        scope = self.deployment_types.get(dtype)
        processing = self.scope(region, dtype)
        if processing is None:
            if scope == "data_zone":
                return unknown(f"{what} is {dtype} but {resource.region} is in no data zone")
            return unknown(f"{what} has deployment type {dtype!r}, whose processing place is "
                           "unknown")
        where = {"anywhere": "any Azure location", "data_zone": "its data zone",
                 "geography": "the resource's geography"}[scope]
        return Location(processing, region.geography, f"{what} is {dtype}: {where}")

    def deployment_of(self, view: RequestView) -> str | None:
        return first_match(self.deployment, view)

    def options(self, endpoint: Endpoint, ctx: OptionContext) -> list[Option]:
        out = []
        for name, resource in ctx.azure.items():
            region = self.azure_regions.get(resource.region.lower())
            if region is None:
                continue
            for deployment, dtype in resource.deployments.items():
                processing = self.scope(region, dtype)
                if processing is None:
                    continue
                out.append(Option(endpoint, "azure", f"{name}/{deployment}",
                                  host_with(endpoint, self.capture, name),
                                  processing | region.geography,
                                  f"use deployment {deployment!r} on Azure resource {name!r} "
                                  f"({dtype} in {resource.region})"))
        return out


def describe_kind(locator: Any) -> str:
    return getattr(locator, "kind", type(locator).__name__)
