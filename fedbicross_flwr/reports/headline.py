"""The headline of a run: who measured the per-site accuracies, their median, and the sites far
from the others.

The paper's metric is the mean over the sites of the official-test accuracy after
personalization (``acc-after``). Where it comes from decides how far it can be trusted:

* ``"server"`` (:data:`SCORED_BY_SERVER`): in a simulation the server holds the official test
  split and the partitions, and scores each site's models itself
  (:mod:`fedbicross_flwr.reports.scoring`); a site's own figures are only compared with it.
* ``"site (self-reported)"`` (:data:`SELF_REPORTED`): in a deployment the server holds no
  site's test data, so every per-site figure is what the site says. One site can then move
  the mean as far as it likes within [0, 1]; the median of three or more sites moves only if
  half of them lie, and :func:`outlier_sites` names a site far from the others.

Outlier rule (:func:`outlier_sites`): with three or more sites, a site is flagged when its
figure is more than ``max(3 x 1.4826 x MAD, 0.10)`` from the median of the sites' figures,
where MAD is the median absolute deviation from that median (1.4826 x MAD estimates the
standard deviation of normally spread figures, so this is a robust z-score above 3; the floor
of 10 points keeps sites with nearly equal figures from flagging each other). Fewer than three
sites have no "others" to compare with: nothing is flagged. The flag is a pointer for a
person, not a refusal: an honest site with unusual data is flagged too, and a site that lies
modestly is not.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Mapping
from typing import Any

SCORED_BY_SERVER = "server"
SELF_REPORTED = "site (self-reported)"
OUTLIER_MADS = 3.0  # a robust z-score above this is far from the others
MAD_TO_STD = 1.4826  # MAD x this estimates the standard deviation (normal figures)
OUTLIER_FLOOR = 0.10  # ... but never closer than 10 points to the median
OUTLIER_RULE = (f"more than max({OUTLIER_MADS:g} x {MAD_TO_STD} x MAD, {OUTLIER_FLOOR:.2f}) "
                "from the median of the sites' figures (3 or more sites)")
# The summary columns the sites report in phase 3, each with its median beside its mean.
PHASE3_COLUMNS = ("acc-after", "acc-before", "acc-personal-after", "acc-personal-before")


def median(values: Iterable[float | None]) -> float | None:
    """Median of the finite values (None, NaN and inf left out); None if there is none."""
    vals = [v for v in values if v is not None and math.isfinite(v)]
    return float(statistics.median(vals)) if vals else None


def outlier_sites(per_site: Mapping[int, float]) -> list[int]:
    """The sites whose figure is far from the others' (the module's rule), sorted.

    Parameters
    ----------
    per_site : mapping of int to float
        Partition-id -> its (finite) figure.
    """
    if len(per_site) < 3:
        return []
    mid = statistics.median(per_site.values())
    mad = statistics.median(abs(v - mid) for v in per_site.values())
    bound = max(OUTLIER_MADS * MAD_TO_STD * mad, OUTLIER_FLOOR)
    return sorted(pid for pid, v in per_site.items() if abs(v - mid) > bound)


def headline(rows: list[dict[str, Any]], scored_by: str) -> dict[str, Any]:
    """The summary's headline keys from the ``clients.csv`` rows of the sites that answered.

    Returns
    -------
    dict
        ``scored-by``; ``<column>-median`` for each phase-3 accuracy column;
        ``acc-after-per-site`` (partition-id -> the paper metric's figure, as text keys);
        ``acc-after-outliers`` (:func:`outlier_sites`, only for self-reported figures: a
        figure the server measured is not suspect, an empty list there) and
        ``outlier-rule``.
    """
    done = [r for r in rows if r.get("status") == "ok"]
    out: dict[str, Any] = {"scored-by": scored_by}
    for col in PHASE3_COLUMNS:
        out[f"{col}-median"] = median(r.get(col) for r in done)
    per_site = {int(r["partition-id"]): float(r["acc-after"]) for r in done
                if r.get("acc-after") is not None and math.isfinite(r["acc-after"])}
    out["acc-after-per-site"] = {str(pid): v for pid, v in sorted(per_site.items())}
    out["acc-after-outliers"] = outlier_sites(per_site) if scored_by == SELF_REPORTED else []
    out["outlier-rule"] = OUTLIER_RULE
    return out


def per_site_text(per_site: Mapping[str, float] | None, outliers: Iterable[int] = (),
                  scale: float = 100.0, digits: int = 2) -> str:
    """``0: 33.33, 1: 33.33, 2: 100.00 (far from the others)``; "n/a" when there is none."""
    if not per_site:
        return "n/a"
    far = {str(p) for p in outliers}
    return ", ".join(f"{pid}: {v * scale:.{digits}f}" + (" (far from the others)"
                                                          if pid in far else "")
                     for pid, v in per_site.items())


__all__ = ["OUTLIER_RULE", "PHASE3_COLUMNS", "SCORED_BY_SERVER", "SELF_REPORTED", "headline",
           "median", "outlier_sites", "per_site_text"]
