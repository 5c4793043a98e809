"""Compile regions.yaml into the core's RegionTree (names -> place sets, once per load)."""

from __future__ import annotations

from ..core.places import GLOBAL, PRIVATE, AzureRegion, Places, RegionTree
from .source import Problem, SourceDoc


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
