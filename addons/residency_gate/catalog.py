"""The provider catalog, compiled once at load time.

Catalog files (YAML, see catalog/README.md) say which hosts belong to which
provider endpoint and how to tell where a request to it is processed. This
module turns them into objects a decision can use without scanning anything:
an exact-host dict, a few host regexes indexed by the host's last two labels,
precompiled path patterns, and place sets already expanded to frozensets.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, unquote

from .regions import AzureRegion, Places, RegionTree, build_region_tree
from .schemas import schema_problems
from .sourcefile import InvalidSource, Problem, SourceDoc, load_yaml

SHIPPED_CATALOG = Path(__file__).resolve().parents[2] / "catalog"
_PLACEHOLDER = re.compile(r"\{([a-z_]+)\}")
_MISSING = object()


class BodyError(ValueError):
    """The request body is needed for the decision but cannot be read as JSON."""


# --------------------------------------------------------------------------- requests


@dataclass
class RequestView:
    """What extractors and locators may read of one request; JSON parsed lazily, once."""

    host: str
    path: str  # raw path, without the query string
    query: str
    body: bytes | None
    captures: dict[str, str] = field(default_factory=dict)
    azure: Mapping[str, AzureResource] = field(default_factory=dict)
    body_error: str | None = None
    _json: Any = _MISSING

    def json(self) -> Any:
        if self.body_error:
            raise BodyError(self.body_error)
        if self._json is _MISSING:
            if not self.body or not self.body.strip():
                self._json = None
            else:
                try:
                    self._json = json.loads(self.body)
                except (ValueError, UnicodeDecodeError) as e:
                    self._json = BodyError(f"request body is not valid JSON ({e})")
        if isinstance(self._json, BodyError):
            raise self._json
        return self._json

    def body_value(self, dotted: tuple[str, ...]) -> Any:
        value = self.json()
        for part in dotted:
            if not isinstance(value, dict):
                return None
            value = value.get(part)
        return value

    def query_param(self, name: str) -> str | None:
        for key, value in parse_qsl(self.query, keep_blank_values=True):
            if key == name:
                return value
        return None


@dataclass(frozen=True)
class AzureResource:
    """An operator-declared Azure OpenAI / Foundry resource (config `azure.resources`)."""

    name: str
    region: str
    deployments: Mapping[str, str]


# --------------------------------------------------------------------------- extractors


def compile_path_pattern(pattern: str) -> re.Pattern[str]:
    """`/model/{model}/` -> a regex searching the raw path; captures stop at `/`."""
    parts = _PLACEHOLDER.split(pattern)
    out = []
    for i, part in enumerate(parts):
        if i % 2 == 0:
            out.append(re.escape(part))
        else:
            lazy = "?" if i + 1 < len(parts) and parts[i + 1] else ""
            out.append(f"(?P<{part}>[^/?#]+{lazy})")
    return re.compile("".join(out))


@dataclass(frozen=True)
class Extractor:
    """Finds one value (a model ID, a deployment name) in a request."""

    kind: str  # body | query | path
    key: tuple[str, ...] | str
    regex: re.Pattern[str] | None = None

    @classmethod
    def compile(cls, spec: Mapping[str, str]) -> Extractor:
        (kind, value), *_ = spec.items()
        if kind == "body":
            return cls("body", tuple(value.split(".")))
        if kind == "query":
            return cls("query", value)
        regex = compile_path_pattern(value)
        return cls("path", next(iter(regex.groupindex)), regex)


    def find(self, req: RequestView) -> str | None:
        if self.kind == "path":
            m = self.regex.search(req.path)
            return unquote(m.group(1)) if m else None
        if self.kind == "query":
            return req.query_param(self.key)
        value = req.body_value(self.key)
        return value if isinstance(value, str) and value else None

    def describe(self) -> str:
        if self.kind == "body":
            return f"body field {'.'.join(self.key)!r}"
        if self.kind == "query":
            return f"query parameter {self.key!r}"
        return f"path segment {self.regex.pattern!r}"


def first_match(extractors: tuple[Extractor, ...], req: RequestView) -> str | None:
    for ex in extractors:
        value = ex.find(req)
        if value:
            return value
    return None


# --------------------------------------------------------------------------- locations


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


def unknown(detail: str) -> Location:
    return Location(None, None, detail)


@dataclass(frozen=True)
class Locator:
    """How an endpoint's places are found; one kind per `locate.from`."""

    kind: str  # constant | unconfirmed | host | path | model_prefix | body | azure
    constant: PlaceSpec | None = None
    capture: str | None = None
    host_capture: str | None = None
    values: Mapping[str, PlaceSpec] = field(default_factory=dict)
    cloud: str | None = None
    cloud_regions: Mapping[str, Places] = field(default_factory=dict)
    pattern: re.Pattern[str] | None = None
    body_field: tuple[str, ...] = ()
    default: PlaceSpec | None = None
    paths: tuple[str, ...] = ()
    deployment: tuple[Extractor, ...] = ()
    azure_regions: Mapping[str, AzureRegion] = field(default_factory=dict)
    everywhere: Places = frozenset()


    def _region(self, value: str, what: str) -> Location:
        value = value.lower()
        if value in self.values:
            return self.values[value].at(f"{what} {value!r}")
        if self.cloud and value in self.cloud_regions:
            places = self.cloud_regions[value]
            return Location(places, places, f"{what} {value!r} ({self.cloud} region)")
        return unknown(f"{what} {value!r} is not in the catalog")

    def locate(self, req: RequestView, model: str | None) -> Location:
        kind = self.kind
        if kind == "constant":
            return self.constant.at("fixed for this endpoint")
        if kind == "unconfirmed":
            return unknown("processing place unconfirmed (no primary source)")
        if kind == "host":
            return self._region(req.captures[self.capture], "host")
        if kind == "path":
            m = self.pattern.search(req.path)
            if not m:
                return unknown("no location in the path")
            location = unquote(m.group(1)).lower()
            if self.host_capture and req.captures.get(self.host_capture, "").lower() != location:
                return unknown(
                    f"host location {req.captures.get(self.host_capture)!r} and path location "
                    f"{location!r} disagree"
                )
            return self._region(location, "location")
        if kind == "model_prefix":
            return self._model_prefix(req, model)
        if kind == "body":
            if self.paths and not req.path.startswith(self.paths):
                return self.default.at(f"path has no {'.'.join(self.body_field)!r} field")
            value = req.body_value(self.body_field)
            if value is None:
                return self.default.at(f"body field {'.'.join(self.body_field)!r} absent (default)")
            if not isinstance(value, str) or value.lower() not in self.values:
                return unknown(f"body field {'.'.join(self.body_field)!r} = {value!r} is not known")
            return self.values[value.lower()].at(f"body field {'.'.join(self.body_field)!r} = {value!r}")
        if kind == "azure":
            return self._azure(req)
        raise AssertionError(kind)

    def _model_prefix(self, req: RequestView, model: str | None) -> Location:
        home = req.captures.get(self.host_capture) if self.host_capture else None
        model_id = model or ""
        if model_id.startswith("arn:"):
            # arn:aws:bedrock:REGION:ACCOUNT:TYPE/ID
            parts = model_id.split(":", 5)
            if len(parts) < 6 or "/" not in parts[5]:
                return unknown(f"model ARN {model_id!r} is not understood")
            home, (rtype, model_id) = parts[3], parts[5].split("/", 1)
            if rtype not in ("inference-profile", "foundation-model"):
                return unknown(
                    f"model ARN of type {rtype!r}: its region cannot be known from the request"
                )
        lowered = model_id.lower()
        for prefix, spec in self.values.items():
            if lowered.startswith(prefix):
                return spec.at(f"model ID prefix {prefix!r} (cross-region inference profile)")
        if home is None:
            return unknown("model has no known prefix and the host names no region")
        return self._region(home, "region")

    def _azure(self, req: RequestView) -> Location:
        resource_name = req.captures[self.capture].lower()
        resource = req.azure.get(resource_name)
        if resource is None:
            return unknown(f"Azure resource {resource_name!r} is not declared in azure.resources")
        region = self.azure_regions.get(resource.region.lower())
        if region is None:
            return unknown(f"Azure region {resource.region!r} is not in the catalog")
        deployment = first_match(self.deployment, req)
        if deployment is None:
            return unknown(f"no deployment named in the request to Azure resource {resource_name!r}")
        dtype = resource.deployments.get(deployment)
        what = f"Azure resource {resource_name!r} ({resource.region}), deployment {deployment!r}"
        if dtype is None:
            return unknown(f"{what} is not declared in azure.resources")
        storage = region.geography
        if dtype.startswith("Global") or dtype == "DeveloperTier":
            return Location(self.everywhere, storage, f"{what} is {dtype}: any Azure location")
        if dtype.startswith("DataZone"):
            if region.data_zone is None:
                return unknown(f"{what} is {dtype} but {resource.region} is in no data zone")
            return Location(region.data_zone, storage, f"{what} is {dtype}: its data zone")
        if dtype in ("Standard", "ProvisionedManaged", "Batch"):
            return Location(storage, storage, f"{what} is {dtype}: the resource's geography")
        return unknown(f"{what} has deployment type {dtype!r}, whose processing place is unknown")


# --------------------------------------------------------------------------- endpoints


@dataclass(frozen=True)
class Provider:
    id: str
    name: str
    api: str
    source: str
    reviewed: str
    file: str


@dataclass(frozen=True)
class Reroute:
    """How a request to an endpoint may be rewritten to a compliant one."""

    strategy: str  # host | vertex_location | body_field | azure_deployment | never
    to: tuple[str, ...] = ()
    reason: str = ""
    availability: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    def offers(self, value: str | None, model: str | None) -> bool:
        """Is `model` offered where `value` (region, location, geo) points?

        No availability data: the provider offers the same models everywhere. Once a
        provider's availability is declared, an unlisted place offers nothing we can prove.
        """
        if not self.availability or model is None:
            return True
        patterns = self.availability.get((value or "").lower())
        if patterns is None:
            return False
        return any(fnmatchcase(model.lower(), p.lower()) for p in patterns)


NO_REROUTE = Reroute("never")


@dataclass(frozen=True)
class Endpoint:
    provider: Provider
    id: str
    name: str
    hosts: tuple[str, ...]
    model: tuple[Extractor, ...]
    locator: Locator
    note: str
    source: str
    reviewed: str
    reroute: Reroute = NO_REROUTE

    @property
    def key(self) -> str:
        return f"{self.provider.id}/{self.id}"



@dataclass(frozen=True)
class HostPattern:
    pattern: str
    regex: re.Pattern[str]
    labels: tuple[str, ...]
    endpoint: Endpoint
    where: tuple[SourceDoc, tuple] = field(compare=False, repr=False, default=None)


def _label_regex(label: str) -> str:
    return "".join(
        f"(?P<{p}>[a-z0-9-]+)" if i % 2 else re.escape(p)
        for i, p in enumerate(_PLACEHOLDER.split(label))
    )


def normalise_host(host: str) -> str:
    """Hosts compare lower-case without a trailing dot (`API.OpenAI.com.` is api.openai.com)."""
    return host.strip().rstrip(".").lower()


@dataclass
class Catalog:
    """Compiled catalog: regions, providers, and fast host lookup."""

    regions: RegionTree
    providers: dict[str, Provider]
    endpoints: list[Endpoint]
    exact: dict[str, Endpoint]
    patterns: dict[str, list[HostPattern]]  # keyed by the host's last two labels
    version: str
    files: list[str]

    def match(self, host: str) -> tuple[Endpoint, dict[str, str]] | None:
        """The endpoint a host belongs to, with its captures; None for non-LLM hosts."""
        host = normalise_host(host)
        endpoint = self.exact.get(host)
        if endpoint is not None:
            return endpoint, {}
        labels = host.split(".")
        for candidate in self.patterns.get(".".join(labels[-2:]), ()):
            if len(candidate.labels) == len(labels):
                m = candidate.regex.fullmatch(host)
                if m:
                    return candidate.endpoint, m.groupdict()
        return None

    def host_patterns(self) -> list[str]:
        return sorted({h for e in self.endpoints for h in e.hosts})


# --------------------------------------------------------------------------- compiling


class _Compiler:
    def __init__(self, regions: RegionTree) -> None:
        self.regions = regions
        self.problems: list[Problem] = []

    def places(self, doc: SourceDoc, path: tuple, names: list[str]) -> Places:
        out: set[str] = set()
        for i, name in enumerate(names):
            if self.regions.knows(name):
                out |= self.regions.expand(name)
            else:
                self.problems.append(doc.problem((*path, i), f"unknown region {name!r}"))
        return frozenset(out)

    def spec(self, doc: SourceDoc, path: tuple, value: Any) -> PlaceSpec:
        if isinstance(value, dict):
            return PlaceSpec(
                self.places(doc, (*path, "processing"), value["processing"]),
                self.places(doc, (*path, "storage"), value["storage"]),
            )
        places = self.places(doc, path, value)
        return PlaceSpec(places, places)

    def values(self, doc: SourceDoc, path: tuple, table: Mapping[str, Any] | None):
        return {
            str(k).lower(): self.spec(doc, (*path, k), v) for k, v in (table or {}).items()
        }

    def locator(self, doc: SourceDoc, path: tuple, raw: dict, captures: set[str]) -> Locator:
        everywhere = self.regions.everywhere
        if raw.get("unconfirmed"):
            return Locator("unconfirmed", everywhere=everywhere)
        if "places" in raw:
            return Locator(
                "constant", constant=self.spec(doc, (*path, "places"), raw["places"]),
                everywhere=everywhere,
            )
        spec = raw["locate"]
        lpath = (*path, "locate")
        kind = spec["from"]
        for key in ("capture", "host_capture"):
            if key in spec and spec[key] not in captures:
                self.problems.append(
                    doc.problem(
                        (*lpath, key),
                        f"rule can never match: {{{spec[key]}}} is not captured by every host "
                        f"pattern of this endpoint",
                    )
                )
        cloud = spec.get("cloud")
        if cloud and cloud not in self.regions.clouds:
            self.problems.append(doc.problem((*lpath, "cloud"), f"no regions for cloud {cloud!r}"))
        common = dict(
            everywhere=everywhere,
            cloud=cloud,
            cloud_regions=self.regions.clouds.get(cloud or "", {}),
        )
        if kind == "host":
            return Locator("host", capture=spec["capture"],
                           values=self._label_values(doc, lpath, spec), **common)
        if kind == "path":
            return Locator(
                "path", pattern=compile_path_pattern(spec["pattern"]),
                host_capture=spec.get("host_capture"),
                values=self._label_values(doc, lpath, spec), **common,
            )
        if kind == "model_prefix":
            return Locator(
                "model_prefix", host_capture=spec.get("host_capture"),
                values=self.values(doc, (*lpath, "prefixes"), spec["prefixes"]), **common,
            )
        if kind == "body":
            default = spec.get("default")
            return Locator(
                "body", body_field=tuple(spec["field"].split(".")),
                values=self.values(doc, (*lpath, "values"), spec["values"]),
                default=self.spec(doc, (*lpath, "default"), default) if default else
                PlaceSpec(everywhere, everywhere),
                paths=tuple(spec.get("paths", ())), **common,
            )
        return Locator(
            "azure", capture=spec["capture"],
            deployment=tuple(Extractor.compile(e) for e in spec["deployment"]),
            azure_regions=self.regions.azure, **common,
        )

    def _label_values(self, doc: SourceDoc, lpath: tuple, spec: dict) -> dict[str, PlaceSpec]:
        values = self.values(doc, (*lpath, "values"), spec.get("values"))
        for key in values:
            if not re.fullmatch(r"[a-z0-9-]+", key):
                self.problems.append(
                    doc.problem((*lpath, "values", key),
                                f"rule can never match: {key!r} cannot appear in a host or path")
                )
        return values


def _host_problems(catalog_patterns: list[HostPattern], exact: dict[str, list[tuple]]) -> list:
    """Pairs of hosts that could both match one host name: ambiguous, so an error."""
    problems = []
    # Each conflict is reported at both places, so whoever edits either file sees it.
    for host, owners in exact.items():
        for (e1, doc1, p1), (e2, doc2, p2) in itertools.pairwise(owners):
            message = f"host {host!r} is claimed by {e1.key} and {e2.key}"
            problems += [doc1.problem(p1, message), doc2.problem(p2, message)]
    for host, owners in exact.items():
        labels = host.split(".")
        for hp in catalog_patterns:
            if len(hp.labels) == len(labels) and hp.regex.fullmatch(host):
                e1, doc1, p1 = owners[0]
                message = (f"host {host!r} ({e1.key}) also matches pattern {hp.pattern!r} "
                           f"({hp.endpoint.key})")
                problems += [doc1.problem(p1, message), hp.where[0].problem(hp.where[1], message)]
    for i, a in enumerate(catalog_patterns):
        for b in catalog_patterns[i + 1:]:
            if len(a.labels) == len(b.labels) and all(
                _labels_overlap(x, y) for x, y in zip(a.labels, b.labels, strict=True)
            ):
                message = (f"host pattern {a.pattern!r} ({a.endpoint.key}) overlaps "
                           f"{b.pattern!r} ({b.endpoint.key})")
                problems += [a.where[0].problem(a.where[1], message),
                             b.where[0].problem(b.where[1], message)]
    return problems


def _labels_overlap(a: str, b: str) -> bool:
    if "{" not in a and "{" not in b:
        return a == b
    if "{" not in a:
        return re.fullmatch(_label_regex(b), a) is not None
    if "{" not in b:
        return re.fullmatch(_label_regex(a), b) is not None
    pa, pb = _PLACEHOLDER.split(a), _PLACEHOLDER.split(b)
    prefix_ok = pa[0].startswith(pb[0]) or pb[0].startswith(pa[0])
    suffix_ok = pa[-1].endswith(pb[-1]) or pb[-1].endswith(pa[-1])
    return prefix_ok and suffix_ok


def _reroute(raw: Mapping[str, Any] | None) -> Reroute:
    if not raw:
        return NO_REROUTE
    return Reroute(
        strategy=raw["strategy"], to=tuple(raw.get("to", ())), reason=raw.get("reason", ""),
        availability={k.lower(): tuple(v["models"]) for k, v in
                      (raw.get("availability") or {}).items()},
    )


def catalog_files(extra: Iterable[Path] = ()) -> tuple[Path | None, list[Path]]:
    """regions.yaml to use and provider files, shipped first, then the operator's."""
    regions = SHIPPED_CATALOG / "regions.yaml"
    providers = sorted((SHIPPED_CATALOG / "providers").glob("*.yaml"))
    for entry in extra:
        if entry.is_dir():
            if (entry / "regions.yaml").exists():
                regions = entry / "regions.yaml"
            sub = entry / "providers" if (entry / "providers").is_dir() else entry
            providers += sorted(p for p in sub.glob("*.yaml") if p.name != "regions.yaml")
        elif entry.name == "regions.yaml":
            regions = entry
        else:
            providers.append(entry)
    return regions, providers


def load_catalog(extra: Iterable[Path] = ()) -> Catalog:
    """Load, validate and compile; raise InvalidSource naming every problem."""
    regions_file, provider_files = catalog_files(extra)
    problems: list[Problem] = []
    digest = hashlib.sha256()

    def read(path: Path, schema: str) -> SourceDoc | None:
        try:
            doc = load_yaml(path)
        except InvalidSource as e:
            problems.extend(e.problems)
            return None
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
        found = schema_problems(doc, schema)
        problems.extend(found)
        return None if found else doc

    regions_doc = read(regions_file, "regions")
    if regions_doc is None:
        raise InvalidSource(problems or [Problem(str(regions_file), 1, "no regions")])
    regions, found = build_region_tree(regions_doc)
    problems.extend(found)

    compiler = _Compiler(regions)
    providers: dict[str, tuple[Provider, list[Endpoint]]] = {}
    where: dict[str, tuple[SourceDoc, dict]] = {}
    for path in provider_files:
        doc = read(path, "provider")
        if doc is None:
            continue
        data = doc.data
        provider = Provider(data["provider"], data["name"], data["api"], data["source"],
                            str(data["reviewed"]), str(path))
        endpoints = []
        seen_ids: set[str] = set()
        for i, raw in enumerate(data["endpoints"]):
            epath = ("endpoints", i)
            if raw["id"] in seen_ids:
                problems.append(doc.problem((*epath, "id"), f"duplicate endpoint id {raw['id']!r}"))
            seen_ids.add(raw["id"])
            captures = set.intersection(*(set(_PLACEHOLDER.findall(h)) for h in raw["hosts"]))
            endpoints.append(Endpoint(
                provider=provider, id=raw["id"], name=raw["name"],
                hosts=tuple(raw["hosts"]),
                model=tuple(Extractor.compile(e) for e in raw.get("model", ())),
                locator=compiler.locator(doc, epath, raw, captures),
                note=raw.get("note", ""), source=raw["source"], reviewed=str(raw["reviewed"]),
                reroute=_reroute(raw.get("reroute")),
            ))
            where[f"{provider.id}/{raw['id']}"] = (doc, {"path": epath})
        for i, endpoint in enumerate(endpoints):
            for j, target in enumerate(endpoint.reroute.to):
                if target not in seen_ids or target == endpoint.id:
                    problems.append(doc.problem(("endpoints", i, "reroute", "to", j),
                                                f"reroute target {target!r} is not another "
                                                f"endpoint of {provider.id}"))
        # A later file with the same provider id replaces the shipped one.
        providers[provider.id] = (provider, endpoints)
    problems.extend(compiler.problems)

    all_endpoints = [e for _, eps in providers.values() for e in eps]
    exact_owners: dict[str, list[tuple]] = {}
    host_patterns: list[HostPattern] = []
    for endpoint in all_endpoints:
        doc, info = where[endpoint.key]
        for j, host in enumerate(endpoint.hosts):
            hpath = (*info["path"], "hosts", j)
            if "{" not in host:
                exact_owners.setdefault(host, []).append((endpoint, doc, hpath))
                continue
            labels = tuple(host.split("."))
            if any("{" in label for label in labels[-2:]):
                problems.append(doc.problem(hpath, f"host pattern {host!r}: the last two labels "
                                                   "must be literal"))
                continue
            regex = re.compile(r"\.".join(_label_regex(label) for label in labels))
            host_patterns.append(HostPattern(host, regex, labels, endpoint, (doc, hpath)))
    problems.extend(_host_problems(host_patterns, exact_owners))
    if problems:
        raise InvalidSource(problems)

    index: dict[str, list[HostPattern]] = {}
    for hp in host_patterns:
        index.setdefault(".".join(hp.labels[-2:]), []).append(hp)
    return Catalog(
        regions=regions,
        providers={pid: p for pid, (p, _) in providers.items()},
        endpoints=all_endpoints,
        exact={h: owners[0][0] for h, owners in exact_owners.items()},
        patterns=index,
        version=digest.hexdigest()[:12],
        files=[str(regions_file), *map(str, provider_files)],
    )



