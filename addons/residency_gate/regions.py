"""The region tree: every name a requirement or a catalog entry may use.

A *place* is a leaf: an ISO-3166 alpha-2 country code in lower case, or
`private` (inside the organisation's perimeter). Every other name (a group
such as `eu`, a cloud region such as `aws:eu-central-1`) expands to a set of
places once, at load time, so deciding is set arithmetic on frozensets.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .sourcefile import Problem, SourceDoc

PRIVATE = "private"
GLOBAL = "global"

type Places = frozenset[str]


@dataclass(frozen=True)
class AzureRegion:
    """What an Azure resource's region implies for each deployment type."""

    country: Places
    geography: Places
    data_zone: Places | None


@dataclass
class RegionTree:
    """Names to place sets, plus the inverse used to describe sets to humans."""

    countries: dict[str, str]
    names: dict[str, Places] = field(default_factory=dict)
    group_names: list[str] = field(default_factory=list)
    clouds: dict[str, dict[str, Places]] = field(default_factory=dict)
    azure: dict[str, AzureRegion] = field(default_factory=dict)
    multi_regions: set[str] = field(default_factory=set)  # "gcp:eu": not one place's region
    _descriptions: dict[Places, str] = field(default_factory=dict, repr=False)
    _by_size: list[str] = field(default_factory=list, repr=False)

    @property
    def everywhere(self) -> Places:
        return self.names[GLOBAL]

    def expand(self, name: str) -> Places:
        """Places a region name stands for; KeyError when the name is unknown."""
        return self.names[name.strip().lower()]

    def expand_all(self, names: list[str] | tuple[str, ...]) -> Places:
        out: set[str] = set()
        for name in names:
            out |= self.expand(name)
        return frozenset(out)

    def knows(self, name: str) -> bool:
        return name.strip().lower() in self.names

    def describe(self, places: Places | None) -> str:
        """Shortest honest name for a set of places: `eu`, `eu + ch`, `anywhere`.

        Memoised: decisions describe the same few sets over and over."""
        if places is None:
            return "unknown"
        found = self._descriptions.get(places)
        if found is None:
            found = self._describe(places)
            if len(self._descriptions) < 10_000:
                self._descriptions[places] = found
        return found

    def _describe(self, places: Places) -> str:
        if not places:
            return "nowhere"
        if places >= self.everywhere - {PRIVATE}:
            return "anywhere"
        if not self._by_size:  # largest groups first, so `eea` wins over `eu` + is + li + no
            self._by_size = sorted((g for g in self.group_names
                                    if g != GLOBAL and len(self.names[g]) > 1),
                                   key=lambda g: -len(self.names[g]))
        rest = set(places)
        parts: list[str] = []
        for group in self._by_size:
            members = self.names[group]
            if members <= rest:
                parts.append(group)
                rest -= members
        parts.extend(sorted(rest))
        return " + ".join(parts)


def build_region_tree(doc: SourceDoc) -> tuple[RegionTree, list[Problem]]:
    """Compile regions.yaml (already schema-valid) into a RegionTree."""
    data = doc.data
    problems: list[Problem] = []
    countries = {str(k).lower(): str(v) for k, v in data["countries"].items()}
    tree = RegionTree(countries=countries)
    for code in countries:
        tree.names[code] = frozenset({code})
    tree.names[PRIVATE] = frozenset({PRIVATE})
    tree.names[GLOBAL] = frozenset(countries) | {PRIVATE}

    groups: dict[str, list[str]] = {
        name.lower(): [str(m).lower() for m in spec["members"]]
        for name, spec in data.get("groups", {}).items()
    }
    resolving: set[str] = set()

    def resolve_group(name: str, path: tuple) -> Places:
        if name in tree.names:
            return tree.names[name]
        if name in resolving:
            problems.append(doc.problem(path, f"group {name!r} contains itself"))
            return frozenset()
        resolving.add(name)
        out: set[str] = set()
        for i, member in enumerate(groups[name]):
            if member == "*":
                out |= tree.names[GLOBAL]
            elif member in groups:
                out |= resolve_group(member, ("groups", member))
            elif member in tree.names:
                out |= tree.names[member]
            else:
                problems.append(
                    doc.problem(("groups", name, "members", i), f"unknown region {member!r}")
                )
        resolving.discard(name)
        tree.names[name] = frozenset(out)
        return tree.names[name]

    for name in groups:
        if name in countries or name == PRIVATE:
            problems.append(doc.problem(("groups", name), f"group {name!r} shadows a place"))
            continue
        resolve_group(name, ("groups", name))
        tree.group_names.append(name)
    if GLOBAL not in tree.group_names:
        tree.group_names.append(GLOBAL)

    def places_of(names: list[str], path: tuple) -> Places:
        out: set[str] = set()
        for i, n in enumerate(names):
            n = str(n).lower()
            if n in tree.names:
                out |= tree.names[n]
            else:
                problems.append(doc.problem((*path, i), f"unknown region {n!r}"))
        return frozenset(out)

    for cloud, spec in data.get("clouds", {}).items():
        table: dict[str, Places] = {}
        for region_id, region in spec.get("regions", {}).items():
            path = ("clouds", cloud, "regions", region_id)
            if "country" in region:
                places = places_of([region["country"]], (*path, "country"))
            else:
                places = places_of(region.get("places", []), (*path, "places"))
                tree.multi_regions.add(f"{cloud}:{region_id}".lower())
            table[region_id.lower()] = places
            tree.names[f"{cloud}:{region_id}".lower()] = places
            if cloud == "azure":
                geography = places_of(region.get("geography", []), (*path, "geography")) or places
                zone = region.get("data_zone")
                zone_places = places_of([zone], (*path, "data_zone")) if zone else None
                tree.azure[region_id.lower()] = AzureRegion(places, geography, zone_places)
        tree.clouds[cloud.lower()] = table
    return tree, problems
