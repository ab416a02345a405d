"""Run-config keys as dataclass fields: a key's name is its field's name, written in kebab case.

Every tunable lives in a small frozen dataclass next to its user (a :class:`Section`): the
synthesis toolkit in :mod:`fedbicross_flwr.distill.config`, the FedBiCross server stage in
:mod:`fedbicross_flwr.fedbicross.config`, each baseline in
:mod:`fedbicross_flwr.methods.baselines.config`, the multi-round references in
:mod:`fedbicross_flwr.methods.flower_strategies`, the shared keys in :mod:`.sections`.
:class:`~fedbicross_flwr.config.run_config.RunConfig` is all sections together, the flat
mapping Flower reads. A field is declared with :func:`key` (default, one-line doc, allowed
range or choices); its run-config key is :func:`key_name` of the field, ``synth_steps`` ->
``synth-steps``, so a concept has one name in the code, the presets and the docs.

This module imports no torch.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass, field
from typing import Any, Mapping, TypeVar

from fedbicross_flwr.keys.errors import ConfigError

S = TypeVar("S", bound="Section")


def key(
    default: Any,
    doc: str,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    choices: tuple[str, ...] | None = None,
    constant: bool = False,
) -> Any:
    """A dataclass field that is a run-config key: its default, doc and allowed values.

    Parameters
    ----------
    default : bool, int, float or str
        The default (the paper's value where the paper gives one); its type is the key's type.
    doc : str
        One line for docs/CONFIG.md's table.
    low, high : float, optional
        The allowed range, ``[low, high]`` (``(low, high]`` with ``low_open``).
    choices : tuple of str, optional
        The allowed strings.
    constant : bool
        An engineering constant of a settings class, checked like a key but not a run-config
        key: :meth:`Section.of` leaves it at its default unless it is overridden.
    """
    meta = {"doc": doc, "low": low, "high": high, "low_open": low_open, "choices": choices,
            "constant": constant}
    return field(default=default, metadata=meta)


def same_key(section: type, name: str) -> Any:
    """A field equal to ``section``'s field ``name`` (same default, doc and range).

    For a section that reads a key another section owns (FedBiCross's settings read ``seed``
    and ``precision``): the key is declared once, where it belongs.
    """
    owner = {f.name: f for f in dataclasses.fields(section)}[name]
    return field(default=owner.default, metadata=owner.metadata)


def key_name(f: dataclasses.Field) -> str:
    """The run-config key of a field: its name in kebab case (``kd_batch`` -> ``kd-batch``)."""
    return f.name.replace("_", "-")


def is_key(f: dataclasses.Field) -> bool:
    """Whether a dataclass field was declared with :func:`key`."""
    return "doc" in f.metadata


def coerce(name: str, value: Any, want: type) -> Any:
    """``value`` as the type ``want`` of the key ``name`` (TOML gives ints for floats, ...).

    Raises
    ------
    ConfigError
        The value has another type (a bool is not an int, a float with a fraction is not an
        int).
    """
    if want is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"run-config key {name!r} must be a boolean, got {value!r}")
    if want is int:
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"run-config key {name!r} must be an integer, got {value!r}")
        return value if type(value) is int else int(value)
    if want is float:
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise ConfigError(f"run-config key {name!r} must be a number, got {value!r}")
        return value if type(value) is float else float(value)
    if not isinstance(value, str):
        raise ConfigError(f"run-config key {name!r} must be a string, got {value!r}")
    return value


def check_value(f: dataclasses.Field, value: Any) -> None:
    """Raise :class:`ConfigError` naming the key when ``value`` is outside ``f``'s range, or
    is not finite (NaN, inf).
    """
    meta, name = f.metadata, key_name(f)
    if meta["choices"] is not None and value not in meta["choices"]:
        raise ConfigError(f"run-config key {name!r} must be one of {list(meta['choices'])}, "
                          f"got {value!r}")
    if isinstance(value, float) and not math.isfinite(value):  # NaN, inf: no setting's value
        raise ConfigError(f"run-config key {name!r} must be a finite number, got {value!r}")
    low, high = meta["low"], meta["high"]
    if low is None and high is None:
        return
    bad_low = low is not None and (value <= low if meta["low_open"] else value < low)
    bad_high = high is not None and value > high
    if bad_low or bad_high:
        lo = "-inf" if low is None else f"{low:g}"
        hi = "inf" if high is None else f"{high:g}"
        bracket = "(" if meta["low_open"] else "["
        raise ConfigError(f"run-config key {name!r} must be in {bracket}{lo}, {hi}], "
                          f"got {value!r}")


def allowed(f: dataclasses.Field) -> str:
    """The allowed values of a key, as docs/CONFIG.md's table writes them."""
    m = f.metadata
    if m["choices"]:
        return ", ".join(m["choices"])
    lo = "" if m["low"] is None else f"{'>' if m['low_open'] else '>='} {m['low']:g}"
    hi = "" if m["high"] is None else f"<= {m['high']:g}"
    return " and ".join(x for x in (lo, hi) if x)


@dataclass(frozen=True)
class Section:
    """A frozen group of run-config keys; each value is checked against its range when built.

    A subclass declares its keys with :func:`key`. Built from a run config with :meth:`of`, or
    directly (tests, benchmarks), it refuses a value of the wrong type or out of range with a
    :class:`ConfigError` that names the key.
    """

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            if is_key(f):
                value = coerce(key_name(f), getattr(self, f.name), type(f.default))
                if value is not getattr(self, f.name):  # e.g. an int for a float key
                    object.__setattr__(self, f.name, value)
                check_value(f, value)

    @classmethod
    def of(cls: type[S], config: Any, **overrides: Any) -> S:
        """The section of ``config`` (a RunConfig): its keys, some replaced by ``overrides``.

        Raises
        ------
        TypeError
            ``config`` lacks one of the section's keys (a default is never assumed).
        """
        keys = [f.name for f in dataclasses.fields(cls)
                if is_key(f) and not f.metadata.get("constant")]
        if missing := [name for name in keys if name not in overrides
                       and not hasattr(config, name)]:
            raise TypeError(f"{cls.__name__}.of: the config ({type(config).__name__}) has no "
                            f"{', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}")
        values = {name: getattr(config, name) for name in keys if name not in overrides}
        return cls(**{**values, **overrides})

    def with_overrides(self: S, **overrides: Any) -> S:
        """A validated copy with some fields replaced (an unknown name raises TypeError)."""
        return dataclasses.replace(self, **overrides)

    @classmethod
    def keys(cls) -> dict[str, dataclasses.Field]:
        """Run-config key -> field, for this section's keys."""
        return {key_name(f): f for f in dataclasses.fields(cls) if is_key(f)}

    @classmethod
    def from_mapping(cls: type[S], mapping: Mapping[str, Any]) -> S:
        """Build from kebab-case keys; an unknown key raises :class:`ConfigError`."""
        by_key = cls.keys()
        kwargs: dict[str, Any] = {}
        for name, value in mapping.items():
            if name not in by_key:
                raise ConfigError(f"unknown run-config key {name!r}; known keys: "
                                  f"{', '.join(sorted(by_key))}")
            f = by_key[name]
            kwargs[f.name] = coerce(name, value, type(f.default))
        return cls(**kwargs)


__all__ = ["Section", "allowed", "check_value", "coerce", "is_key", "key", "key_name",
           "same_key"]
