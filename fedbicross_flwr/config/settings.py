"""Hyper-parameters of the FedBiCross server side (paper Sec. III-A/B, Sec. IV-A).

:class:`FedBiCrossSettings` is derived from the run config: every :class:`~fedbicross_flwr.
config.RunConfig` field tagged ``setting=<name>`` becomes the settings field ``<name>``, with the
same default (the paper's value where the paper gives one), the same range and the same choices.
The keys, their defaults and their meaning are therefore written once, in
:mod:`fedbicross_flwr.config.run_config` (and docs/CONFIG.md's table generated from it). The settings use the
algorithm's names (``tau`` for ``kd-temperature``, ``val_fraction`` for ``bilevel-val-fraction``,
``noise_momentum`` = beta of Eq. 3, ...). The only fields without a run-config key are the
engineering constants in :data:`ENGINEERING_FIELDS`.

Built directly (tests, benchmarks) the settings are validated against the same ranges;
:func:`settings_from_config` builds them from a validated run config.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from .run_config import ConfigError, RunConfig, _check_value, _coerce, kd_batch_problem

# Settings that are not run-config keys: name -> (type, default, minimum).
ENGINEERING_FIELDS: dict[str, tuple[type, Any, int]] = {
    "num_examples": (int, 16, 0),  # final synthetic images per cluster kept for a picture grid
    "label_chunk": (int, 8, 1),  # trajectory steps forwarded together for soft labels (memory)
}


def tagged_fields(config_cls: type = RunConfig) -> list[dataclasses.Field]:
    """The run-config fields that set a FedBiCross setting, in run-config order."""
    return [f for f in dataclasses.fields(config_cls) if f.metadata.get("setting")]


def settings_class(config_cls: type = RunConfig) -> type:
    """The frozen settings dataclass of a run-config dataclass's tagged fields.

    Each tagged field gives one settings field (named by its tag) with the same type and
    default; ``__post_init__`` checks each value against the field's run-config range and
    choices, the engineering constants against their minimum, and ``kd_batch``.
    """
    tagged = tagged_fields(config_cls)

    def validate(self: Any) -> None:
        for f in tagged:
            name = f.metadata["setting"]
            try:
                _coerce(f.metadata["key"], getattr(self, name), type(f.default))
                _check_value(f, getattr(self, name))
            except ConfigError as err:
                raise ValueError(f"FedBiCrossSettings.{name}: {err}") from None
        for name, (kind, _, minimum) in ENGINEERING_FIELDS.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, kind) or value < minimum:
                raise ValueError(f"FedBiCrossSettings.{name} must be an integer >= {minimum}, "
                                 f"got {value!r}")
        if (problem := kd_batch_problem(self.kd_batch, self.synth_batch)) is not None:
            raise ValueError(f"FedBiCrossSettings.kd_batch {problem}")

    def with_overrides(self: Any, **overrides: Any) -> Any:
        """Return a validated copy with some fields replaced (unknown names raise TypeError)."""
        return dataclasses.replace(self, **overrides)

    cls = dataclasses.make_dataclass(
        "FedBiCrossSettings",
        [(f.metadata["setting"], type(f.default), dataclasses.field(default=f.default))
         for f in tagged]
        + [(name, kind, dataclasses.field(default=default))
           for name, (kind, default, _) in ENGINEERING_FIELDS.items()],
        frozen=True,
        namespace={"__post_init__": validate, "with_overrides": with_overrides,
                   "__doc__": "All knobs of Stages 1 and 2 (clustering, synthesis, noise "
                              "adaptation, bi-level KD), from the tagged run-config fields."},
    )
    cls.__module__ = __name__
    return cls


FedBiCrossSettings = settings_class(RunConfig)


def settings_from_config(cfg: RunConfig, **overrides: Any) -> Any:
    """The FedBiCross settings of a run config (e.g. ``num_clusters=k`` as an override)."""
    values = {f.metadata["setting"]: getattr(cfg, f.name) for f in tagged_fields()}
    return FedBiCrossSettings(**{**values, **overrides})


__all__ = ["ENGINEERING_FIELDS", "FedBiCrossSettings", "settings_class", "settings_from_config",
           "tagged_fields"]
