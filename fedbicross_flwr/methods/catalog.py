"""The catalog of server methods: one torch-free spec per method, the only list of them.

A spec says what the rest of the project needs to know about a method without importing it
(and so without torch): its name, its kind, whether it distils from synthetic images and its
group and row in the paper's tables. The configuration validates ``method`` / ``methods``
against it, and the knowledge flow, the distill-check, the privacy audit and the grid's tables
read their method sets from it. Nothing is looked up by a string: a one-shot method runs
through its Flower strategy (:data:`fedbicross_flwr.strategies.BY_METHOD`, whose class imports
its function), a multi-round one through :func:`fedbicross_flwr.methods.rounds.flower_r`, and
a reference through :data:`fedbicross_flwr.server.REFERENCES`.

Adding a method: write ``fedbicross_flwr/methods/<name>.py`` with a function
``(MethodInput) -> MethodOutput`` and register its spec below; a one-shot method also gets its
strategy, a subclass of ``OneShotStrategy`` in ``fedbicross_flwr/strategies/<name>.py``
listed in ``STRATEGIES`` (the project's run finds it there).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from fedbicross_flwr.methods.flower_strategies import FLOWER_STRATEGIES

Kind = Literal["one-shot", "multi-round", "reference"]
Group = Literal["baseline", "ours", "reference"]


@dataclass(frozen=True)
class MethodSpec:
    """What is known about a server method without importing it.

    Attributes
    ----------
    name : str
        The run-config name (``method`` / ``methods``).
    kind : {'one-shot', 'multi-round', 'reference'}
        One-shot methods aggregate the one-shot uploads; multi-round methods replace phase 1
        by R rounds (they retrain the clients); references are the bounds a federated method
        is read against (no federation, pooled data).
    group : {'baseline', 'ours', 'reference'}
        Its group in the paper's tables (``harness.tables``).
    row : int
        Its row within that group (the paper's order).
    distils : bool
        It synthesises images and distils the clients' knowledge from them (``synthetic.pt``,
        ``knowledge.json``, the distill-check).
    teacher_ensemble : {'config', 'logit'}
        For a distilling method, the ensemble its teacher uses: ``'config'`` follows the run
        config's ``ensemble`` key, ``'logit'`` averages logits.
    strategy : str or None
        The class in ``flwr.serverapp.strategy`` that configures and aggregates a
        multi-round method's rounds (``FedAvg``, ``FedAdam``, ``Krum``, ...).
    """

    name: str
    kind: Kind
    group: Group
    row: int
    distils: bool = False
    teacher_ensemble: Literal["config", "logit"] = "config"
    strategy: str | None = None

    @property
    def multiround(self) -> bool:
        """Phase 1 is R rounds instead of one upload."""
        return self.kind == "multi-round"


CATALOG: dict[str, MethodSpec] = {}


def register(spec: MethodSpec) -> MethodSpec:
    """Add a method's spec (names are unique); returns it."""
    if spec.name in CATALOG:
        raise ValueError(f"method {spec.name!r} is already registered")
    CATALOG[spec.name] = spec
    return spec


def method_spec(name: str) -> MethodSpec:
    """The spec of ``name``, with the known names in the error."""
    if name not in CATALOG:
        raise KeyError(f"unknown method {name!r}; registered: {sorted(CATALOG)}")
    return CATALOG[name]


def method_names(*, kind: Kind | None = None, group: Group | None = None,
                 distils: bool | None = None) -> tuple[str, ...]:
    """The registered names (in registration order), optionally of one kind, group or both."""
    return tuple(s.name for s in CATALOG.values()
                 if (kind is None or s.kind == kind) and (group is None or s.group == group)
                 and (distils is None or s.distils == distils))


def table_rows(group: Group) -> tuple[str, ...]:
    """The names of one table group in the paper's row order."""
    return tuple(s.name for s in sorted((s for s in CATALOG.values() if s.group == group),
                                        key=lambda s: s.row))


# The methods, in the order the configuration lists them.
register(MethodSpec("fedavg1", "one-shot", "baseline", 0))
register(MethodSpec("local", "reference", "reference", 0))
register(MethodSpec("fedbicross", "one-shot", "ours", 0, distils=True))
register(MethodSpec("central", "reference", "reference", 99))  # last
register(MethodSpec("fedisca", "one-shot", "baseline", 3, distils=True))
register(MethodSpec("dense", "one-shot", "baseline", 2, distils=True,
                    teacher_ensemble="logit"))
register(MethodSpec("coboosting", "one-shot", "baseline", 4, distils=True,
                    teacher_ensemble="logit"))
register(MethodSpec("dafl", "one-shot", "baseline", 1, distils=True,
                    teacher_ensemble="logit"))
register(MethodSpec("cluster-fedavg", "one-shot", "baseline", 5))


def _register_flower_strategies() -> None:
    """Flower's strategies, one multi-round reference row each (:mod:`.flower_strategies`)."""
    for row, entry in enumerate(FLOWER_STRATEGIES, start=1):
        register(MethodSpec(entry.method, "multi-round", "reference", row, strategy=entry.cls))


_register_flower_strategies()

__all__ = ["CATALOG", "MethodSpec", "method_names", "method_spec", "register", "table_rows"]
