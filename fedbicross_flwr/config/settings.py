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
from typing import TYPE_CHECKING, Any

from .run_config import ConfigError, RunConfig, _check_value, _coerce, kd_batch_problem

# Settings that are not run-config keys: name -> (type, default, minimum).
ENGINEERING_FIELDS: dict[str, tuple[type[int], int, int]] = {
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


@dataclasses.dataclass(frozen=True, init=False)
class SettingsFields:
    """The static view of :class:`FedBiCrossSettings` for type checkers: its fields, in order.

    The class itself is built from the run config at import (:func:`settings_class`), which
    type checkers cannot follow; ``tests/fedbicross/test_fedbicross_settings.py`` checks that
    these annotations are exactly its fields and types.
    """

    seed: int
    mixed_precision: str
    compile: bool
    num_clusters: int
    noise_samples: int
    server_epochs: int
    kd_passes: int
    kd_batch: int
    synth_steps: int
    synth_batch: int
    synth_lr: float
    tv_weight: float
    bn_weight: float
    tau: float
    noise_momentum: float
    noise_cutoff: float
    noise_teacher_mode: str
    ensemble: str
    bn_reduction: str
    jitter: int
    kmeans_n_init: int
    cluster_on: str
    val_fraction: float
    student_lr: float
    student_momentum: float
    student_weight_decay: float
    weight_lr: float
    hypergrad_normalisation: str
    student_init: str
    student_bn: str
    weights_mode: str
    num_examples: int
    label_chunk: int

    def __init__(self, **fields: Any) -> None: ...  # noqa: D107 - see settings_class

    def with_overrides(self, **overrides: Any) -> SettingsFields:
        """Return a validated copy with some fields replaced (unknown names raise TypeError)."""
        raise NotImplementedError  # the built class has the real method


if TYPE_CHECKING:
    FedBiCrossSettings = SettingsFields
else:
    FedBiCrossSettings = settings_class(RunConfig)


def settings_from_config(cfg: RunConfig, **overrides: Any) -> FedBiCrossSettings:
    """The FedBiCross settings of a run config (e.g. ``num_clusters=k`` as an override)."""
    values = {f.metadata["setting"]: getattr(cfg, f.name) for f in tagged_fields()}
    return FedBiCrossSettings(**{**values, **overrides})


__all__ = ["ENGINEERING_FIELDS", "FedBiCrossSettings", "SettingsFields", "settings_class",
           "settings_from_config", "tagged_fields"]
