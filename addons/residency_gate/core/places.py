"""Places: the region tree every requirement and every catalog entry is written in.

A *place* is a leaf: an ISO-3166 alpha-2 country code in lower case, or
`private` (inside the organisation's perimeter). Every other name (a group
such as `eu`, a cloud region such as `aws:eu-central-1`) expands to a set of
places once, at load time, so deciding is set arithmetic on frozensets.
"""

from __future__ import annotations

from dataclasses import dataclass, field

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
    _lists: dict[Places, list[str]] = field(default_factory=dict, repr=False)
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
        return " + ".join(self._cover(places))

    def _cover(self, places: Places) -> list[str]:
        """Group names (largest first, so `eea` wins over `eu` + is + li + no), then the
        places no group covers."""
        if not self._by_size:
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
        return parts

    def region_list(self, places: Places | None) -> list[str] | None:
        """A place set as records store it: sorted region names. Group names mean what the
        catalog revision named in the same record says, so the list is exact and short."""
        if places is None:
            return None
        found = self._lists.get(places)
        if found is None:
            found = [GLOBAL] if places == self.everywhere else sorted(self._cover(places))
            if len(self._lists) < 10_000:
                self._lists[places] = found
        return list(found)

