"""Run configuration: every tunable is a kebab-case key, parsed and validated once.

The keys live in ``[tool.flwr.app.config]`` of ``pyproject.toml`` (Flower only accepts overrides
of keys that exist there) and in the presets under ``conf/``. Each key is a field of a small
section next to its user (:mod:`fedbicross_flwr.keys.fields` says how a field names its key);
:class:`RunConfig` is every section together, the single typed view of the flat mapping. Each
field's metadata holds its allowed range and a one-line doc, so docs/CONFIG.md's table and the
pyproject defaults are checked against the sections by the tests.

An invalid value fails here, before any data is read or any model is trained, with a
:class:`ConfigError` that names the key and what it accepts.
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from fedbicross_flwr.distill.config import SynthesisConfig, kd_batch_problem
from fedbicross_flwr.fedbicross.config import FedBiCrossConfig
from fedbicross_flwr.keys.errors import ConfigError
from fedbicross_flwr.keys.fields import allowed, key_name
from fedbicross_flwr.keys.sections import (
    ExecutionConfig,
    FederationConfig,
    LocalTrainingConfig,
    PersonalizationConfig,
    TaskConfig,
)
from fedbicross_flwr.methods.baselines.config import (
    CoBoostingConfig,
    DAFLConfig,
    DenseConfig,
    FedISCAConfig,
    GeneratorConfig,
)
from fedbicross_flwr.methods.catalog import method_names
from fedbicross_flwr.methods.flower_strategies import (
    BY_METHOD,
    MultiRoundConfig,
    MultiRoundRunConfig,
    method_args,
    qualifying_methods,
    strategy_kwargs,
)
from fedbicross_flwr.storage.paths import not_a_file

# The sections in the order of docs/CONFIG.md's table. A dataclass takes its bases' fields
# from the last base to the first, so RunConfig lists them reversed (SharedConfig: the first
# five; MultiRoundRunConfig: those and MultiRoundConfig).
SECTIONS: tuple[type, ...] = (
    TaskConfig, FederationConfig, LocalTrainingConfig, PersonalizationConfig, ExecutionConfig,
    MultiRoundConfig, SynthesisConfig, FedBiCrossConfig, FedISCAConfig, GeneratorConfig,
    DenseConfig, CoBoostingConfig, DAFLConfig,
)


@dataclass(frozen=True)
class RunConfig(DAFLConfig, CoBoostingConfig, DenseConfig, GeneratorConfig, FedISCAConfig,
                FedBiCrossConfig, SynthesisConfig, MultiRoundRunConfig):
    """Typed, validated run configuration: the shared keys and every method's section.

    The sections, in :data:`SECTIONS` order: the shared ones of
    :class:`~fedbicross_flwr.keys.sections.SharedConfig` (task, federation, local training,
    personalization, execution),
    :class:`~fedbicross_flwr.methods.flower_strategies.MultiRoundConfig` (the two together:
    :class:`~fedbicross_flwr.methods.flower_strategies.MultiRoundRunConfig`),
    :class:`~fedbicross_flwr.distill.config.SynthesisConfig`,
    :class:`~fedbicross_flwr.fedbicross.config.FedBiCrossConfig` and the baselines'
    (:mod:`fedbicross_flwr.methods.baselines.config`). ``Section.of(cfg)`` reads one of them.
    """

    # ------------------------------------------------------------------------------------
    def __post_init__(self) -> None:
        super().__post_init__()  # each key against its range, the shared checks
        if self.num_clusters > self.num_clients:
            raise ConfigError(
                f"num-clusters={self.num_clusters} must be <= num-clients={self.num_clients}"
            )
        if self.method not in method_names():
            raise ConfigError(f"run-config key 'method' must be one of {method_names()}, "
                              f"got {self.method!r}")
        if (problem := kd_batch_problem(self.kd_batch, self.synth_batch)) is not None:
            raise ConfigError(f"kd-batch {problem}")
        methods = self.method_list  # validates the names of `methods`
        if self.strategy_args.strip() and not set(methods) & set(method_names(
                kind="multi-round")):
            listed = ", ".join(repr(m) for m in methods)
            raise ConfigError(
                f"strategy-args is set, but {'methods' if len(methods) > 1 else 'method'} "
                f"{listed} {'take' if len(methods) > 1 else 'takes'} no strategy arguments "
                f"(only the multi-round methods do: {', '.join(method_names(kind='multi-round'))})"
                f"; leave strategy-args empty, got {self.strategy_args!r}")
        rounds = [m for m in methods if m in method_names(kind="multi-round")]
        if stray := [m for m in qualifying_methods(self.strategy_args) if m not in rounds]:
            raise ConfigError(f"strategy-args qualifies a pair with {stray[0]!r}, which is not "
                              f"a multi-round method of this run ({', '.join(rounds)}); got "
                              f"{self.strategy_args!r}")

    # ------------------------------------------------------------------------------------
    @property
    def method_list(self) -> list[str]:
        """The server methods of the run: ``methods`` split at commas, else ``[method]``.

        Raises
        ------
        ConfigError
            On an unknown or repeated name.
        """
        names = [m.strip() for m in self.methods.split(",") if m.strip()] or [self.method]
        if self.methods.strip() and not self.methods.replace(",", "").strip():
            raise ConfigError(f"run-config key 'methods' names no method: {self.methods!r} "
                              "(leave it empty to run `method` alone)")
        known = method_names()
        for name in names:
            if name not in known:
                raise ConfigError(f"run-config key 'methods': unknown method {name!r}; known: "
                                  f"{', '.join(known)}")
        if len(set(names)) < len(names):
            raise ConfigError(f"run-config key 'methods' names a method twice: {self.methods!r}")
        return names

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> "RunConfig":
        """Build from Flower's ``context.run_config`` (kebab-case keys).

        Raises
        ------
        ConfigError
            On an unknown key, a value of the wrong type, or a value out of range.
        """
        return cls.from_mapping(run_config)

    def for_method(self, method: str, run_name: str) -> "RunConfig":
        """The config of ``method`` alone, one of ``methods``, in the run folder ``run_name``:
        without ``methods``, and with only its own ``strategy-args`` (the plain pairs and those
        qualified with its name; none for a method that is not multi-round).
        """
        uses = method in method_names(kind="multi-round")
        return self.replace(method=method, methods="", run_name=run_name,
                            strategy_args=method_args(self.strategy_args, method) if uses
                            else "")


def check_strategy_args(cfg: RunConfig) -> None:
    """Check the Flower strategy arguments of every multi-round method of the run (``method``
    or ``methods``), before any training.

    Raises
    ------
    ConfigError
        A ``strategy-args`` pair a method's strategy does not take, or a value of the wrong
        type (:func:`~.flower_strategies.strategy_kwargs`), naming the method when the run
        has several.
    """
    rounds = [m for m in cfg.method_list if m in BY_METHOD]
    for name in rounds:
        try:
            strategy_kwargs(cfg.replace(method=name), cfg.num_clients)
        except ConfigError as err:
            if len(rounds) == 1:
                raise
            raise ConfigError(f"{name}: {err} (a pair for one method alone is written "
                              f"<method>:<name>=<value>, e.g. '{rounds[0]}:eta=0.05')"
                              ) from None


def load_preset(path: str | Path, what: str = "preset") -> dict[str, Any]:
    """Read a preset (a flat TOML file of run-config keys, as ``flwr run --run-config`` takes).

    Raises
    ------
    ConfigError
        ``path`` is missing or no regular file (a folder, a FIFO, a device: named, and never
        read), or not valid TOML; the line starts with ``what`` and the path.
    """
    path = Path(path)
    if (problem := not_a_file(path, "a TOML file")) is not None:
        raise ConfigError(f"{what} {path} " + ("does not exist" if problem == "not found"
                                               else problem))
    with path.open("rb") as fh:
        try:
            return tomllib.load(fh)
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
            raise ConfigError(f"{what} {path} is not valid TOML: {err}") from err


def parse_overrides(text: str) -> dict[str, Any]:
    """Parse ``"key=value key2='str'"`` exactly as ``flwr run --run-config`` does (TOML)."""
    if not text.strip():
        return {}
    import shlex

    try:
        return tomllib.loads("\n".join(shlex.split(text, posix=False)))
    except (ValueError, tomllib.TOMLDecodeError) as err:  # shlex: "No closing quotation"
        raise ConfigError(f"cannot parse run-config overrides {text!r}: {err}") from err


def markdown_table() -> str:
    """docs/CONFIG.md's run-config table, generated from the dataclass."""
    rows = ["| key | default | allowed | meaning |", "|---|---|---|---|"]
    for f in dataclasses.fields(RunConfig):
        ok = ", ".join(method_names()) if f.name == "method" else allowed(f)  # the catalog's
        rows.append(f"| `{key_name(f)}` | `{f.default!r}` | {ok} | {f.metadata['doc']} |")
    return "\n".join(rows)
