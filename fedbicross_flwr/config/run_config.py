"""Run configuration: every tunable is a kebab-case key, parsed and validated once.

The keys live in ``[tool.flwr.app.config]`` of ``pyproject.toml`` (Flower only accepts overrides
of keys that exist there) and in the presets under ``conf/``. Each key is a field of a small
section next to its user (:mod:`fedbicross_flwr.config.fields` says how a field names its key);
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

from fedbicross_flwr.config.errors import ConfigError
from fedbicross_flwr.config.fields import allowed, key_name
from fedbicross_flwr.config.sections import (
    ExecutionConfig,
    FederationConfig,
    LocalTrainingConfig,
    PersonalizationConfig,
    TaskConfig,
)
from fedbicross_flwr.distill.config import SynthesisConfig, kd_batch_problem
from fedbicross_flwr.fedbicross.config import FedBiCrossConfig
from fedbicross_flwr.methods.baselines.config import (
    CoBoostingConfig,
    DAFLConfig,
    DenseConfig,
    FedISCAConfig,
    GeneratorConfig,
)
from fedbicross_flwr.methods.catalog import method_names
from fedbicross_flwr.methods.flower_strategies import (
    MultiRoundConfig,
    method_args,
    qualifying_methods,
)
from fedbicross_flwr.storage.paths import not_a_file

# The sections in the order of docs/CONFIG.md's table. A dataclass takes its bases' fields
# from the last base to the first, so RunConfig lists them reversed.
SECTIONS: tuple[type, ...] = (
    TaskConfig, FederationConfig, LocalTrainingConfig, PersonalizationConfig, ExecutionConfig,
    SynthesisConfig, FedBiCrossConfig, MultiRoundConfig, FedISCAConfig, GeneratorConfig, DenseConfig,
    CoBoostingConfig, DAFLConfig,
)


@dataclass(frozen=True)
class RunConfig(DAFLConfig, CoBoostingConfig, DenseConfig, GeneratorConfig, FedISCAConfig,
                MultiRoundConfig, FedBiCrossConfig, SynthesisConfig, ExecutionConfig,
                PersonalizationConfig, LocalTrainingConfig, FederationConfig, TaskConfig):
    """Typed, validated run configuration: every section's keys (one field per key).

    The sections, in :data:`SECTIONS` order: :class:`~.sections.TaskConfig`,
    :class:`~.sections.FederationConfig`, :class:`~.sections.LocalTrainingConfig`,
    :class:`~.sections.PersonalizationConfig`, :class:`~.sections.ExecutionConfig`,
    :class:`~fedbicross_flwr.distill.config.SynthesisConfig`,
    :class:`~fedbicross_flwr.fedbicross.config.FedBiCrossConfig`,
    :class:`~fedbicross_flwr.methods.flower_strategies.MultiRoundConfig` and the baselines'
    (:mod:`fedbicross_flwr.methods.baselines.config`). ``Section.of(cfg)`` reads one of them.
    """

    # ------------------------------------------------------------------------------------
    def __post_init__(self) -> None:
        super().__post_init__()  # each key against its range
        if self.min_clients > self.num_clients:
            raise ConfigError(
                f"min-clients={self.min_clients} exceeds num-clients={self.num_clients}"
            )
        if self.num_clusters > self.num_clients:
            raise ConfigError(
                f"num-clusters={self.num_clusters} must be <= num-clients={self.num_clients}"
            )
        if self.dataset == "custom" and not self.data_path and not (self.in_channels
                                                                  and self.num_classes):
            raise ConfigError("dataset='custom' needs data-path (an npz archive), or "
                              "in-channels and num-classes when every site sets data-path in "
                              "its node config (deployment)")
        try:
            parse_site_nodes(self.site_nodes)
        except ValueError as err:
            raise ConfigError(f"site-nodes: {err}") from err
        if self.output_dir and not Path(self.output_dir).is_absolute():
            raise ConfigError(f"output-dir must be an absolute path, got {self.output_dir!r}")
        if (problem := kd_batch_problem(self.kd_batch, self.synth_batch)) is not None:
            raise ConfigError(f"kd-batch {problem}")
        if self.run_name and (self.run_name in (".", "..") or "/" in self.run_name
                              or "\\" in self.run_name):
            raise ConfigError(f"run-name must be one folder name inside output-dir (no '/', "
                              f"'\\' or '..'), got {self.run_name!r}")
        if any(ord(c) < 32 or ord(c) == 127 for c in self.run_name):
            raise ConfigError(f"run-name must hold no control character (newline, tab, ...), "
                              f"got {self.run_name!r}")
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
        if self.resume and not self.run_name:
            raise ConfigError("resume=true needs run-name (the run folder to continue)")

    # ------------------------------------------------------------------------------------
    @property
    def effective_min_clients(self) -> int:
        """Fewest answering clients phase 1 accepts."""
        return self.min_clients or self.num_clients

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

    @property
    def sites_bring_data(self) -> bool:
        """Deployment: every site reads its own archive and the server holds no dataset."""
        return self.dataset == "custom" and not self.data_path

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> "RunConfig":
        """Build from Flower's ``context.run_config`` (kebab-case keys).

        Raises
        ------
        ConfigError
            On an unknown key, a value of the wrong type, or a value out of range.
        """
        return cls.from_mapping(run_config)

    def to_run_config(self) -> dict[str, Any]:
        """The kebab-case mapping (inverse of :meth:`from_run_config`)."""
        return {key_name(f): getattr(self, f.name) for f in dataclasses.fields(self)}

    def replace(self, **overrides: Any) -> "RunConfig":
        """A copy with some fields (snake_case names) changed, validated again."""
        return dataclasses.replace(self, **overrides)

    def for_method(self, method: str, run_name: str) -> "RunConfig":
        """The config of ``method`` alone, one of ``methods``, in the run folder ``run_name``:
        without ``methods``, and with only its own ``strategy-args`` (the plain pairs and those
        qualified with its name; none for a method that is not multi-round).
        """
        uses = method in method_names(kind="multi-round")
        return self.replace(method=method, methods="", run_name=run_name,
                            strategy_args=method_args(self.strategy_args, method) if uses
                            else "")

    def summary(self) -> str:
        """One line per key, for the log."""
        return "\n".join(f"  {k} = {v!r}" for k, v in self.to_run_config().items())


def parse_site_nodes(text: str) -> dict[int, int]:
    """``"0=123, 1=456"`` -> ``{0: 123, 1: 456}`` (partition-id -> Flower node id).

    Raises
    ------
    ValueError
        A pair that is not ``int=int``, a negative partition-id, or a partition or node named
        twice.
    """
    out: dict[int, int] = {}
    for pair in (p.strip() for p in text.replace(";", ",").split(",")):
        if not pair:
            continue
        pid_text, sep, node_text = pair.partition("=")
        try:
            if not sep:
                raise ValueError
            pid, node = int(pid_text), int(node_text)
        except ValueError:
            raise ValueError(f"{pair!r} is not partition-id=node-id (two integers)") from None
        if pid < 0:
            raise ValueError(f"partition-id {pid} is negative")
        if pid in out:
            raise ValueError(f"partition-id {pid} is bound twice")
        if node in out.values():
            raise ValueError(f"node {node} is bound to two partitions")
        out[pid] = node
    return out


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
        rows.append(f"| `{key_name(f)}` | `{f.default!r}` | {allowed(f)} | {f.metadata['doc']} |")
    return "\n".join(rows)
