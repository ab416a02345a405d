"""Flower's own strategies as multi-round reference rows, by name.

Every strategy of ``flwr.serverapp.strategy`` (flwr 1.42) that applies to a PyTorch model is
a method ``<name>-r``: R communication rounds in which Flower's strategy object configures
each round (``configure_train``) and aggregates its replies (``aggregate_train``), in every
engine (:mod:`.rounds` drives them). The DP wrappers wrap Flower's FedAvg. The XGBoost
strategies (``FedXgbBagging``, ``FedXgbCyclic``) aggregate trees, not arrays, and are not
offered.

Arguments. The project sets what ties a strategy to the protocol: every connected node trains
each round (``fraction_train = 1``, ``min_*_nodes`` = the number of nodes), no federated
evaluation (the personalization round evaluates every method the same way), the record keys
and the client weight ``num-examples``; the DP wrappers clip ``num_sampled_clients`` = every
node; q-FedAvg's ``client_learning_rate`` is ``local-lr`` and its loss key ``train-loss``;
FedProx's ``proximal_mu`` is the ``proximal-mu`` key. Everything else comes from the run-config
key ``strategy-args``, written as Flower names them (``"eta=0.01 beta_1=0.9"``), checked
against the strategy's signature: an unknown name, a reserved one or a value of the wrong type
is a :class:`~fedbicross_flwr.keys.errors.ConfigError` naming it. A run comparing several
multi-round methods (``methods``) gives every one of them the plain pairs, and one of them
alone a pair qualified with its name (``"fedadam-r:eta=0.05 krum-r:num_malicious_nodes=1"``,
:func:`method_args`).

Client-side DP: the server's wrapper sends ``clipping_norm``; the site clips its update with
Flower's ``fixedclipping_mod`` / ``adaptiveclipping_mod``
(:func:`~fedbicross_flwr.client.dp_clipping_mod` picks the one the round asks for;
the adaptive one adds the metric ``norm_bit``, whether the update was clipped, which the
server's wrapper reads to adapt the norm).

This module imports Flower lazily: the catalog reads :data:`FLOWER_STRATEGIES` without it.
"""

from __future__ import annotations

import inspect
import tomllib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from fedbicross_flwr.keys.errors import ConfigError
from fedbicross_flwr.keys.fields import Section, key
from fedbicross_flwr.keys.sections import SharedConfig

if TYPE_CHECKING:
    from flwr.serverapp.strategy import Strategy


@dataclass(frozen=True)
class MultiRoundConfig(Section):
    """The keys of the multi-round references (``fedavg-r``, ``fedadam-r``, ``krum-r``, ...)."""

    rounds: int = key(10, "R, communication rounds of a multi-round method.",
                      low=1, high=10000)
    strategy_args: str = key("",
                             "Arguments of the multi-round method's Flower strategy, as "
                             "Flower names them, e.g. \"eta=0.01 beta_1=0.9\" for fedadam-r "
                             "or \"noise_multiplier=0.5 clipping_norm=2.0\" for a DP wrapper "
                             "(checked against the strategy's signature; refused when no "
                             "method of the run is multi-round). With several multi-round "
                             "methods, a pair qualified with a method's name is that "
                             "method's alone: \"fedadam-r:eta=0.05\".")
    round_epochs: int = key(0,
                            "Local epochs per round of a multi-round method (0 = "
                            "ceil(local-epochs / rounds): the clients' total compute matches "
                            "the one-shot phase 1).", low=0)
    proximal_mu: float = key(0.01,
                             "FedProx mu: clients add mu/2 times the squared L2 distance to the "
                             "global model to their loss "
                             "(fedprox-r; sent by the server as proximal-mu).",
                             low=0.0, high=1e4)



@dataclass(frozen=True)
class MultiRoundRunConfig(MultiRoundConfig, SharedConfig):
    """What a multi-round method's run reads: the shared keys and :class:`MultiRoundConfig`
    (a :class:`~fedbicross_flwr.config.run_config.RunConfig` is one).
    """


@dataclass(frozen=True)
class FlowerStrategy:
    """One Flower strategy offered as a reference row.

    Attributes
    ----------
    method : str
        The run-config method name (``<name>-r``).
    cls : str
        The class in ``flwr.serverapp.strategy``; a DP wrapper wraps ``FedAvg``.
    dp_wrapper : bool
        ``cls`` is a differential-privacy wrapper around Flower's FedAvg.
    client_clipping : {'fixed', 'adaptive'} or None
        The client mod a client-side DP wrapper needs.
    defaults : dict
        Values of the strategy's required arguments when ``strategy-args`` omits them.
    """

    method: str
    cls: str
    dp_wrapper: bool = False
    client_clipping: Literal["fixed", "adaptive"] | None = None
    defaults: dict[str, Any] = field(default_factory=dict)


# DP defaults, for the wrappers' required arguments: noise_multiplier 0.1 and a clipping norm
# of 1. Flower recommends >= 1.0 for strong privacy; at a handful of clients that noise (std
# noise_multiplier x clipping_norm / clients on every coordinate) wrecks a BatchNorm model's
# statistics, and the adaptive wrappers refuse it unless clipped_count_stddev is raised.
_DP = {"noise_multiplier": 0.1}
FLOWER_STRATEGIES: tuple[FlowerStrategy, ...] = (
    FlowerStrategy("fedavg-r", "FedAvg"),
    FlowerStrategy("fedprox-r", "FedProx"),
    FlowerStrategy("fedavgm-r", "FedAvgM"),
    FlowerStrategy("fedadagrad-r", "FedAdagrad"),
    FlowerStrategy("fedadam-r", "FedAdam"),
    FlowerStrategy("fedyogi-r", "FedYogi"),
    FlowerStrategy("qfedavg-r", "QFedAvg"),
    FlowerStrategy("fedmedian-r", "FedMedian"),
    FlowerStrategy("fedtrimmedavg-r", "FedTrimmedAvg"),
    FlowerStrategy("krum-r", "Krum"),
    FlowerStrategy("multikrum-r", "MultiKrum"),
    FlowerStrategy("bulyan-r", "Bulyan"),
    FlowerStrategy("dp-fixed-server-r", "DifferentialPrivacyServerSideFixedClipping",
                   dp_wrapper=True, defaults={**_DP, "clipping_norm": 1.0}),
    FlowerStrategy("dp-fixed-client-r", "DifferentialPrivacyClientSideFixedClipping",
                   dp_wrapper=True, client_clipping="fixed",
                   defaults={**_DP, "clipping_norm": 1.0}),
    FlowerStrategy("dp-adaptive-server-r", "DifferentialPrivacyServerSideAdaptiveClipping",
                   dp_wrapper=True, defaults=dict(_DP)),
    FlowerStrategy("dp-adaptive-client-r", "DifferentialPrivacyClientSideAdaptiveClipping",
                   dp_wrapper=True, client_clipping="adaptive", defaults=dict(_DP)),
)
BY_METHOD = {s.method: s for s in FLOWER_STRATEGIES}

# Arguments the protocol sets (see the module docstring); strategy-args may not name them.
RESERVED = frozenset({
    "fraction_train", "fraction_evaluate", "min_train_nodes", "min_evaluate_nodes",
    "min_available_nodes", "weighted_by_key", "arrayrecord_key", "configrecord_key",
    "train_metrics_aggr_fn", "evaluate_metrics_aggr_fn", "train_loss_key",
    "client_learning_rate", "proximal_mu", "strategy", "num_sampled_clients", "accountant"})


def parse_strategy_args(text: str) -> dict[str, Any]:
    """``"eta=0.01 beta_1=0.9, tau=1e-9"`` -> ``{"eta": 0.01, "beta_1": 0.9, "tau": 1e-9}``.

    Pairs are separated by spaces or commas; each value is a TOML literal (a number, true /
    false, or a quoted string).

    Raises
    ------
    ConfigError
        A pair that is not ``name=value`` or a value that is not a TOML literal.
    """
    args: dict[str, Any] = {}
    for pair in text.replace(",", " ").split():
        name, sep, value = pair.partition("=")
        if not sep or not name.isidentifier():
            raise ConfigError(f"strategy-args: {pair!r} is not name=value (e.g. 'eta=0.01')")
        try:
            args[name] = tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError:
            raise ConfigError(f"strategy-args: the value of {name} ({value!r}) is not a "
                              "number, true/false or a quoted string") from None
    return args


def _pairs(text: str) -> list[tuple[str | None, str]]:
    """``strategy-args``'s pairs, each with the method it is qualified with (None: every
    multi-round method of the run).
    """
    pairs: list[tuple[str | None, str]] = []
    for pair in text.replace(",", " ").split():
        owner, sep, rest = pair.partition(":")
        qualified = sep and "=" not in owner  # a ':' after the '=' is the value's
        pairs.append((owner, rest) if qualified else (None, pair))
    return pairs


def qualifying_methods(text: str) -> list[str]:
    """The method names ``strategy-args`` qualifies pairs with (``fedadam-r:eta=0.05``)."""
    return list(dict.fromkeys(owner for owner, _ in _pairs(text) if owner is not None))


def method_args(text: str, method: str) -> str:
    """The ``strategy-args`` of ``method``: the plain pairs and the pairs qualified with its
    name (``"eta=0.1 krum-r:num_malicious_nodes=1"`` is ``"eta=0.1"`` for fedadam-r).
    """
    return " ".join(pair for owner, pair in _pairs(text) if owner in (None, method))


def _type_problem(value: Any, annotation: Any) -> str | None:
    """Why ``value`` does not fit a strategy argument annotated ``annotation``, or None."""
    text = str(annotation)
    wanted = [t for t in ("bool", "int", "float", "str") if t in text.replace("'", "")]
    if not wanted:
        return "it is not a number, a bool or a string argument"
    ok = (isinstance(value, bool) if wanted == ["bool"] else
          (not isinstance(value, bool) and (
              (isinstance(value, int) and ("int" in wanted or "float" in wanted))
              or (isinstance(value, float) and "float" in wanted)
              or (isinstance(value, str) and "str" in wanted))))
    return None if ok else f"{value!r} is a {type(value).__name__}, it takes {' or '.join(wanted)}"


def strategy_kwargs(cfg: MultiRoundRunConfig, num_nodes: int) -> tuple[FlowerStrategy, dict[str, Any]]:
    """The entry of ``cfg.method`` and the keyword arguments of its Flower class.

    Raises
    ------
    ConfigError
        ``cfg.method`` is not a Flower strategy row; ``strategy-args`` names an argument the
        class does not take or the protocol sets, or gives a value of the wrong type.
    """
    from flwr.serverapp import strategy as flower

    if cfg.method not in BY_METHOD:
        raise ConfigError(f"method {cfg.method!r} is not one of Flower's strategies "
                          f"({', '.join(BY_METHOD)})")
    entry = BY_METHOD[cfg.method]
    params = inspect.signature(getattr(flower, entry.cls)).parameters
    given = parse_strategy_args(method_args(cfg.strategy_args, cfg.method))
    for name, value in given.items():
        if name in RESERVED:
            raise ConfigError(f"strategy-args: {name} is set by the protocol for {entry.cls}"
                              + (" (set proximal-mu)" if name == "proximal_mu" else "")
                              + (" (set local-lr)" if name == "client_learning_rate" else ""))
        if name not in params:
            allowed = sorted(set(params) - RESERVED - {"self"})
            raise ConfigError(f"strategy-args: {entry.cls} takes no argument {name!r}; it "
                              f"takes {allowed}")
        problem = _type_problem(value, params[name].annotation)
        if problem:
            raise ConfigError(f"strategy-args: {entry.cls}'s {name}: {problem}")
    kwargs = {**entry.defaults, **given}
    nodes = {"min_train_nodes": num_nodes, "min_available_nodes": num_nodes}
    if entry.dp_wrapper:
        kwargs |= {"num_sampled_clients": num_nodes}
    else:
        kwargs |= {"fraction_train": 1.0, "fraction_evaluate": 0.0, **nodes}
    if entry.cls == "FedProx":
        kwargs["proximal_mu"] = cfg.proximal_mu
    if entry.cls == "QFedAvg":
        kwargs |= {"client_learning_rate": cfg.local_lr, "train_loss_key": "train-loss"}
    return entry, kwargs


def build_strategy(cfg: MultiRoundRunConfig, num_nodes: int) -> "Strategy":
    """Flower's strategy object for ``cfg.method``, every one of ``num_nodes`` nodes trained
    each round.

    Raises
    ------
    ConfigError
        See :func:`strategy_kwargs`; also a value the strategy itself refuses (its
        ``ValueError``, e.g. a negative noise multiplier).
    """
    from flwr.serverapp import strategy as flower

    entry, kwargs = strategy_kwargs(cfg, num_nodes)
    try:
        if entry.dp_wrapper:
            inner = flower.FedAvg(fraction_train=1.0, fraction_evaluate=0.0,
                                  min_train_nodes=num_nodes, min_available_nodes=num_nodes)
            return getattr(flower, entry.cls)(inner, **kwargs)  # type: ignore[no-any-return]
        return getattr(flower, entry.cls)(**kwargs)  # type: ignore[no-any-return]
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{entry.cls}({kwargs}): {err}") from None


__all__ = ["BY_METHOD", "FLOWER_STRATEGIES", "FlowerStrategy", "MultiRoundConfig",
           "MultiRoundRunConfig", "build_strategy", "method_args",
           "parse_strategy_args", "qualifying_methods", "strategy_kwargs"]
