"""How old the catalog's knowledge is: `reviewed` dates against `catalog_max_age`.

A provider's facts change (new regions, new residency options); an entry nobody
has checked for months is a warning in `check` and an age in /metrics, so that
somebody looks again before it is wrong.
"""

from __future__ import annotations

from datetime import date

from ..core.endpoints import Catalog, Review


def age_days(review: Review, today: date | None = None) -> int:
    return ((today or date.today()) - date.fromisoformat(review.reviewed)).days


def stale(catalog: Catalog, max_age_days: int, today: date | None = None
          ) -> list[tuple[Review, int]]:
    """Entries reviewed longer ago than `max_age_days`, oldest first."""
    out = [(r, age_days(r, today)) for r in catalog.reviews]
    return sorted(((r, a) for r, a in out if a > max_age_days), key=lambda x: -x[1])


def oldest_by_provider(catalog: Catalog, today: date | None = None) -> dict[str, int]:
    """Provider -> age in days of its least recently reviewed entry."""
    out: dict[str, int] = {}
    for review in catalog.reviews:
        out[review.provider] = max(out.get(review.provider, 0), age_days(review, today))
    return out
