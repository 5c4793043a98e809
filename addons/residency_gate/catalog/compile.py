"""Compile catalog files into the core's objects, reporting every problem at its line.

Catalog files (YAML, see catalog/README.md) say which hosts belong to which
provider endpoint and how to tell where a request to it is processed;
`apis.yaml` says how each wire format shapes errors and carries credentials.
"""

from __future__ import annotations

import hashlib
import itertools
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..core.apis import Api
from ..core.endpoints import (
    NO_REROUTE,
    Catalog,
    Endpoint,
    HostPattern,
    Provider,
    RerouteSpec,
    Review,
    Services,
)
from ..core.extract import PLACEHOLDER, Extractor, compile_field_pattern, compile_path_pattern
from ..core.locate import (
    AZURE_SCOPES,
    ArnGrammar,
    AzureLocator,
    BodyLocator,
    ConstantLocator,
    HostLocator,
    Locator,
    ModelPrefixLocator,
    PathLocator,
    PlaceSpec,
    RegionTable,
    UnconfirmedLocator,
)
from ..core.places import Places, RegionTree
from .data import shipped_dir
from .regions import build_region_tree
from .schema import schema_problems
from .source import InvalidSource, Problem, SourceDoc, load_yaml

INVENTORY = "inventory.yaml"


@dataclass(frozen=True)
class CatalogFiles:
    regions: Path
    apis: Path
    providers: list[Path]
    dirs: list[Path]  # directories whose new files a reload must notice
    inventory: list[Path] = field(default_factory=list)  # AI services not placed


def catalog_files(extra: Iterable[Path] = ()) -> CatalogFiles:
    """regions.yaml, apis.yaml and provider files: shipped first, then the operator's."""
    shipped = shipped_dir()
    regions, apis = shipped / "regions.yaml", shipped / "apis.yaml"
    providers = sorted((shipped / "providers").glob("*.yaml"))
    inventory = [shipped / "inventory.yaml"]  # services merge by id, a later one replaces
    dirs = [shipped / "providers"]
    for entry in extra:
        if entry.is_dir():
            if (entry / "regions.yaml").exists():
                regions = entry / "regions.yaml"
            if (entry / "apis.yaml").exists():
                apis = entry / "apis.yaml"
            if (entry / INVENTORY).exists():
                inventory.append(entry / INVENTORY)
            sub = entry / "providers" if (entry / "providers").is_dir() else entry
            providers += sorted(p for p in sub.glob("*.yaml")
                                if p.name not in ("regions.yaml", "apis.yaml", INVENTORY))
            dirs += [entry] + ([sub] if sub != entry else [])
        elif entry.name == "regions.yaml":
            regions = entry
        elif entry.name == "apis.yaml":
            apis = entry
        elif entry.name == INVENTORY:
            inventory.append(entry)
            dirs.append(entry.parent)
        else:
            providers.append(entry)
            dirs.append(entry.parent)
    return CatalogFiles(regions, apis, providers, dirs, inventory)


class _Compiler:
    """Turns schema-valid provider documents into endpoints, collecting problems."""

    def __init__(self, regions: RegionTree, apis: dict[str, Api]) -> None:
        self.regions = regions
        self.apis = apis
        self.problems: list[Problem] = []
        self.reviews: list[Review] = []

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
            return PlaceSpec(self.places(doc, (*path, "processing"), value["processing"]),
                             self.places(doc, (*path, "storage"), value["storage"]))
        places = self.places(doc, path, value)
        return PlaceSpec(places, places)

    def values(self, doc: SourceDoc, path: tuple,
               table: Mapping[str, Any] | None) -> dict[str, PlaceSpec]:
        return {str(k).lower(): self.spec(doc, (*path, k), v) for k, v in (table or {}).items()}

    def table(self, doc: SourceDoc, lpath: tuple, spec: dict) -> RegionTable:
        cloud = spec.get("cloud")
        if cloud and cloud not in self.regions.clouds:
            self.problems.append(doc.problem((*lpath, "cloud"), f"no regions for cloud {cloud!r}"))
        values = self.values(doc, (*lpath, "values"), spec.get("values"))
        for key in values:
            if not re.fullmatch(r"[a-z0-9-]+", key):
                self.problems.append(doc.problem(
                    (*lpath, "values", key),
                    f"rule can never match: {key!r} cannot appear in a host or path"))
        return RegionTable(values, cloud, self.regions.clouds.get(cloud or "", {}))

    def locator(self, doc: SourceDoc, path: tuple, raw: dict, captures: set[str]) -> Locator:
        if raw.get("unconfirmed"):
            return UnconfirmedLocator()
        if "places" in raw:
            return ConstantLocator(self.spec(doc, (*path, "places"), raw["places"]))
        spec = raw["locate"]
        lpath = (*path, "locate")
        for key in ("capture", "host_capture"):
            if key in spec and spec[key] not in captures:
                self.problems.append(doc.problem(
                    (*lpath, key), f"rule can never match: {{{spec[key]}}} is not captured by "
                                   "every host pattern of this endpoint"))
        kind = spec["from"]
        if kind == "host":
            return HostLocator(spec["capture"], self.table(doc, lpath, spec))
        if kind == "path":
            return PathLocator(compile_path_pattern(spec["pattern"]),
                               self.table(doc, lpath, spec), spec.get("host_capture"))
        if kind == "model_prefix":
            arn = spec.get("arn")
            return ModelPrefixLocator(
                self.values(doc, (*lpath, "prefixes"), spec["prefixes"]),
                self.table(doc, lpath, {"cloud": spec.get("cloud")}),
                spec.get("host_capture"),
                self.arn(doc, (*lpath, "arn"), arn) if arn else None)
        if kind == "body":
            everywhere = self.regions.everywhere
            default = spec.get("default")
            return BodyLocator(
                tuple(spec["field"].split(".")),
                self.values(doc, (*lpath, "values"), spec["values"]),
                self.spec(doc, (*lpath, "default"), default) if default
                else PlaceSpec(everywhere, everywhere),
                tuple(spec.get("paths", ())))
        return AzureLocator(spec["capture"],
                            tuple(Extractor.compile(e) for e in spec["deployment"]),
                            dict(spec["deployment_types"]), self.regions.azure,
                            self.regions.everywhere)

    def arn(self, doc: SourceDoc, path: tuple, spec: dict) -> ArnGrammar | None:
        regex = compile_field_pattern(spec["pattern"])
        missing = {"region", "type", "id"} - set(regex.groupindex)
        if missing:
            self.problems.append(doc.problem((*path, "pattern"), "ARN pattern must capture "
                                             f"{', '.join(sorted(missing))}"))
            return None
        return ArnGrammar(regex, tuple(spec["types"]))

    def provider(self, doc: SourceDoc, path: Path) -> tuple[Provider, list[Endpoint]]:
        data = doc.data
        api = self.apis.get(data["api"])
        if api is None:
            self.problems.append(doc.problem(("api",), f"unknown api {data['api']!r} (apis.yaml "
                                             f"defines {', '.join(sorted(self.apis))})"))
            api = next(iter(self.apis.values()))
        provider = Provider(data["provider"], data["name"], api, data["source"],
                            str(data["reviewed"]), str(path))
        self.reviews.append(Review(provider.id, provider.id, provider.reviewed, doc.file,
                                   doc.line(("reviewed",))))
        endpoints: list[Endpoint] = []
        seen: set[str] = set()
        for i, raw in enumerate(data["endpoints"]):
            epath = ("endpoints", i)
            if raw["id"] in seen:
                self.problems.append(doc.problem((*epath, "id"),
                                                 f"duplicate endpoint id {raw['id']!r}"))
            seen.add(raw["id"])
            captures = set.intersection(*(set(PLACEHOLDER.findall(h)) for h in raw["hosts"]))
            endpoints.append(Endpoint(
                provider=provider, id=raw["id"], name=raw["name"], hosts=tuple(raw["hosts"]),
                model=tuple(Extractor.compile(e) for e in raw.get("model", ())),
                locator=self.locator(doc, epath, raw, captures),
                note=raw.get("note", ""), source=raw["source"], reviewed=str(raw["reviewed"]),
                reroute=_reroute(raw.get("reroute"))))
            self.reviews.append(Review(provider.id, f"{provider.id}/{raw['id']}",
                                       str(raw["reviewed"]), doc.file,
                                       doc.line((*epath, "reviewed"))))
        for i, endpoint in enumerate(endpoints):
            for j, target in enumerate(endpoint.reroute.to):
                if target not in seen or target == endpoint.id:
                    self.problems.append(doc.problem(
                        ("endpoints", i, "reroute", "to", j),
                        f"reroute target {target!r} is not another endpoint of {provider.id}"))
        return provider, endpoints


def _reroute(raw: Mapping[str, Any] | None) -> RerouteSpec:
    if not raw:
        return NO_REROUTE
    return RerouteSpec(
        strategy=raw["strategy"], to=tuple(raw.get("to", ())), reason=raw.get("reason", ""),
        availability={k.lower(): tuple(v["models"])
                      for k, v in (raw.get("availability") or {}).items()},
        credentials=raw.get("credentials", "carry"),
        credentials_note=" ".join(raw.get("credentials_note", "").split()))


def _apis(doc: SourceDoc) -> dict[str, Api]:
    out = {}
    for api_id, raw in doc.data["apis"].items():
        error = raw["error"]
        key = raw.get("key") or {}
        out[api_id] = Api(
            id=api_id, name=raw["name"], error_body=error["body"],
            error_headers=dict(error.get("headers") or {}),
            error_types={int(k): v for k, v in (error.get("types") or {}).items()},
            default_error_type=error.get("default_type", "error"),
            credential_headers=tuple(h.lower() for h in raw.get("credential_headers", ())),
            key_header=key.get("header", "").lower() or None,
            key_format=key.get("format", "{key}"), path_prefix=raw.get("path_prefix"))
    return out


def _label_regex(label: str) -> str:
    return "".join(f"(?P<{p}>[a-z0-9-]+)" if i % 2 else re.escape(p)
                   for i, p in enumerate(PLACEHOLDER.split(label)))


def _labels_overlap(a: str, b: str) -> bool:
    if "{" not in a and "{" not in b:
        return a == b
    if "{" not in a:
        return re.fullmatch(_label_regex(b), a) is not None
    if "{" not in b:
        return re.fullmatch(_label_regex(a), b) is not None
    pa, pb = PLACEHOLDER.split(a), PLACEHOLDER.split(b)
    prefix_ok = pa[0].startswith(pb[0]) or pb[0].startswith(pa[0])
    suffix_ok = pa[-1].endswith(pb[-1]) or pb[-1].endswith(pa[-1])
    return prefix_ok and suffix_ok


type Where = tuple[SourceDoc, tuple]


def _host_index(endpoints: list[Endpoint], where: dict[str, Where]
                ) -> tuple[dict[str, Endpoint], dict[str, list[HostPattern]], list[Problem]]:
    """Exact hosts and indexed patterns; two hosts that could match one name are an error,
    reported at both places so whoever edits either file sees it."""
    problems: list[Problem] = []
    exact: dict[str, list[tuple[Endpoint, Where]]] = {}
    patterns: list[tuple[HostPattern, Where]] = []
    for endpoint in endpoints:
        doc, epath = where[endpoint.key]
        for j, host in enumerate(endpoint.hosts):
            at = (doc, (*epath, "hosts", j))
            if "{" not in host:
                exact.setdefault(host, []).append((endpoint, at))
                continue
            labels = tuple(host.split("."))
            if any("{" in label for label in labels[-2:]):
                problems.append(doc.problem(at[1], f"host pattern {host!r}: the last two labels "
                                                   "must be literal"))
                continue
            regex = re.compile(r"\.".join(_label_regex(label) for label in labels))
            patterns.append((HostPattern(host, regex, labels, endpoint), at))

    def both(message: str, a: Where, b: Where) -> None:
        problems.extend([a[0].problem(a[1], message), b[0].problem(b[1], message)])

    for host, owners in exact.items():
        for (e1, w1), (e2, w2) in itertools.pairwise(owners):
            both(f"host {host!r} is claimed by {e1.key} and {e2.key}", w1, w2)
        labels = host.split(".")
        for hp, w in patterns:
            if len(hp.labels) == len(labels) and hp.regex.fullmatch(host):
                both(f"host {host!r} ({owners[0][0].key}) also matches pattern {hp.pattern!r} "
                     f"({hp.endpoint.key})", owners[0][1], w)
    for i, (a, wa) in enumerate(patterns):
        for b, wb in patterns[i + 1:]:
            if len(a.labels) == len(b.labels) and all(
                    _labels_overlap(x, y) for x, y in zip(a.labels, b.labels, strict=True)):
                both(f"host pattern {a.pattern!r} ({a.endpoint.key}) overlaps {b.pattern!r} "
                     f"({b.endpoint.key})", wa, wb)
    index: dict[str, list[HostPattern]] = {}
    for hp, _ in patterns:
        index.setdefault(".".join(hp.labels[-2:]), []).append(hp)
    return {h: owners[0][0] for h, owners in exact.items()}, index, problems


def load_catalog(extra: Iterable[Path] = ()) -> Catalog:
    """Load, validate and compile; raise InvalidSource naming every problem."""
    files = catalog_files(extra)
    problems: list[Problem] = []
    digest = hashlib.sha256()

    def read(path: Path, schema: str) -> SourceDoc | None:
        try:
            doc = load_yaml(path)
        except InvalidSource as e:
            problems.extend(e.problems)
            return None
        digest.update(path.name.encode() + b"\0" + doc.raw + b"\0")
        found = schema_problems(doc, schema)
        problems.extend(found)
        return None if found else doc

    regions_doc = read(files.regions, "regions")
    apis_doc = read(files.apis, "apis")
    if regions_doc is None or apis_doc is None:
        raise InvalidSource(problems or [Problem(str(files.regions), 1, "no regions")])
    regions, found = build_region_tree(regions_doc)
    problems.extend(found)
    compiler = _Compiler(regions, _apis(apis_doc))
    providers: dict[str, tuple[Provider, list[Endpoint]]] = {}
    where: dict[str, Where] = {}
    for path in files.providers:
        doc = read(path, "provider")
        if doc is None:
            continue
        provider, endpoints = compiler.provider(doc, path)
        for i, endpoint in enumerate(endpoints):
            where[endpoint.key] = (doc, ("endpoints", i))
        providers[provider.id] = (provider, endpoints)  # a later file replaces a shipped one
    problems.extend(compiler.problems)
    all_endpoints = [e for _, eps in providers.values() for e in eps]
    problems.extend(_azure_type_problems(all_endpoints, where))
    exact, index, found = _host_index(all_endpoints, where)
    problems.extend(found)
    inventory_docs = [doc for doc in (read(p, "inventory") for p in files.inventory) if doc]
    services, found = _services(inventory_docs, compiler.apis, exact, providers)
    problems.extend(found)
    if problems:
        raise InvalidSource(problems)
    return Catalog(
        regions=regions, apis=compiler.apis,
        providers={pid: p for pid, (p, _) in providers.items()},
        endpoints=all_endpoints, exact=exact, patterns=index,
        revision=digest.hexdigest()[:16],
        files=[str(files.regions), str(files.apis), *map(str, files.providers),
               *map(str, files.inventory)],
        services=services,
        dirs=sorted({str(d) for d in files.dirs}),
        reviews=[r for r in compiler.reviews  # of the files in force (a replaced one is not)
                 if r.provider in providers and providers[r.provider][0].file == r.file])


def _services(docs: list[SourceDoc], apis: dict[str, Api], exact: dict[str, Endpoint],
              providers: dict[str, tuple[Provider, list[Endpoint]]]
              ) -> tuple[Services, list[Problem]]:
    """Inventory services as Endpoints of unknown place; a later file's id replaces."""
    problems: list[Problem] = []
    entries: dict[str, tuple[SourceDoc, int, dict]] = {}
    for doc in docs:
        for i, raw in enumerate(doc.data["services"]):
            entries[raw["id"]] = (doc, i, raw)
    services = Services()
    claimed: dict[str, str] = {}
    for sid, (doc, i, raw) in entries.items():
        path = ("services", i)
        api = apis.get(raw.get("api", "other"))
        if api is None:
            problems.append(doc.problem((*path, "api"), f"unknown api {raw['api']!r}"))
            continue
        alternative = raw.get("alternative")
        if alternative is not None and alternative not in providers:
            problems.append(doc.problem((*path, "alternative"),
                                        f"no catalog provider {alternative!r}"))
        category = "unplaced_api" if raw["category"] == "llm_api" else "app"
        provider = Provider(sid, raw["name"], api, raw["source"], str(raw["reviewed"]),
                            doc.file, category)
        endpoint = Endpoint(
            provider=provider, id="app" if category == "app" else "api",
            name=f"{raw['name']} ({raw['vendor']}, {raw['category'].replace('_', ' ')})",
            hosts=tuple(raw["hosts"]), model=(), locator=UnconfirmedLocator(),
            note=raw.get("note", "An AI service whose processing place the catalog does not "
                                 "know; it satisfies no residency requirement."),
            source=raw["source"], reviewed=str(raw["reviewed"]))
        services.endpoints.append(endpoint)
        services.reviews.append(Review(sid, endpoint.key, endpoint.reviewed, doc.file,
                                       doc.line((*path, "reviewed"))))
        if alternative:
            services.alternatives[endpoint.key] = alternative
        for j, host in enumerate(raw["hosts"]):
            name = host.removeprefix("*.")
            if host in exact:
                problems.append(doc.problem((*path, "hosts", j), f"host {host!r} is an endpoint "
                                            f"of {exact[host].key}: list it there only"))
            elif host in claimed:
                problems.append(doc.problem((*path, "hosts", j),
                                            f"host {host!r} is claimed by {claimed[host]} too"))
            claimed[host] = sid
            (services.domains if host.startswith("*.") else services.exact)[name] = endpoint
    return services, problems


def _azure_type_problems(endpoints: list[Endpoint], where: dict[str, Where]) -> list[Problem]:
    problems = []
    for endpoint in endpoints:
        if isinstance(endpoint.locator, AzureLocator):
            doc, epath = where[endpoint.key]
            for dtype, scope in endpoint.locator.deployment_types.items():
                if scope not in AZURE_SCOPES:
                    problems.append(doc.problem(
                        (*epath, "locate", "deployment_types", dtype),
                        f"deployment type {dtype!r}: scope {scope!r} is not one of "
                        f"{', '.join(AZURE_SCOPES)}"))
    return problems


def azure_deployment_types(catalog: Catalog) -> dict[str, str]:
    """Every Azure deployment type the catalog knows (config declarations must use one)."""
    out: dict[str, str] = {}
    for endpoint in catalog.endpoints:
        if isinstance(endpoint.locator, AzureLocator):
            out.update(endpoint.locator.deployment_types)
    return out
