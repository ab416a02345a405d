"""FedBiCrossSettings: derived from the run config (one source of keys, defaults, ranges)."""

import dataclasses
import typing

import pytest

from fedbicross_flwr.config.run_config import CLUSTER_ON, RunConfig, _key
from fedbicross_flwr.config.settings import (
    ENGINEERING_FIELDS,
    FedBiCrossSettings,
    SettingsFields,
    settings_class,
    settings_from_config,
    tagged_fields,
)


def test_defaults_are_the_papers_values():
    # Prepare / Execute
    s = FedBiCrossSettings()
    # Assert (paper Sec. IV-A)
    assert (s.num_clusters, s.noise_samples, s.synth_steps, s.synth_batch) == (2, 256, 500, 256)
    assert (s.synth_lr, s.tv_weight, s.bn_weight, s.tau) == (0.05, 2.5e-5, 10.0, 20.0)
    assert s.val_fraction == 0.2
    assert s.noise_momentum == 0.9  # beta of Eq. 3: the weight of the old statistic
    assert s.noise_teacher_mode == "eval" and s.weights_mode == "bilevel"


def test_every_setting_is_a_run_config_key_with_the_same_default():
    # Prepare
    settings = {f.name: f for f in dataclasses.fields(FedBiCrossSettings)}
    tagged = {f.metadata["setting"]: f for f in tagged_fields()}
    # Assert: the settings are exactly the tagged keys plus the named engineering constants
    assert set(settings) == set(tagged) | set(ENGINEERING_FIELDS)
    assert not set(tagged) & set(ENGINEERING_FIELDS)
    assert len(tagged) == len(tagged_fields())  # no two keys set the same field
    for name, f in tagged.items():
        assert settings[name].default == f.default, name
        assert settings[name].type is type(f.default), name
    # the hand-written mapping this replaces: a few renamed keys
    keys = {name: f.metadata["key"] for name, f in tagged.items()}
    assert (keys["tau"], keys["val_fraction"], keys["noise_cutoff"]) == (
        "kd-temperature", "bilevel-val-fraction", "noise-ema-cutoff")
    assert (keys["hypergrad_normalisation"], keys["mixed_precision"]) == (
        "hypergrad-norm", "precision")


def test_the_static_view_for_type_checkers_is_exactly_the_fields():
    # Prepare: what type checkers read (a class body) and what the run config builds
    static = typing.get_type_hints(SettingsFields)
    built = {f.name: f.type for f in dataclasses.fields(FedBiCrossSettings)}
    # Assert: the same names, in the same order, with the same types
    assert list(static) == list(built)
    assert static == built


def test_a_new_key_is_declared_in_one_place():
    # Prepare: one more FedBiCross key, declared once, as a field of the run config
    @dataclasses.dataclass(frozen=True)
    class Extended(RunConfig):
        new_knob: float = _key("new-knob", 0.25, "A new knob.", low=0.0, high=1.0,
                               setting="new_knob")

    # Execute
    settings = settings_class(Extended)
    # Assert: it is a setting with the key's default and range
    assert settings().new_knob == 0.25
    assert settings(new_knob=1.0).new_knob == 1.0
    with pytest.raises(ValueError, match="new_knob"):
        settings(new_knob=1.5)
    assert {f.name for f in dataclasses.fields(settings)} == (
        {f.name for f in dataclasses.fields(FedBiCrossSettings)} | {"new_knob"})


def test_settings_from_config_copies_every_tagged_key():
    # Prepare: a non-default value for every tagged key that has room for one
    changed = {}
    for f in tagged_fields():
        m = f.metadata
        if m["choices"]:
            changed[f.name] = next(c for c in m["choices"] if c != f.default)
        elif isinstance(f.default, bool):
            changed[f.name] = not f.default
        elif f.name not in ("kd_batch", "num_clusters"):
            changed[f.name] = f.default + 1 if isinstance(f.default, int) else f.default / 2
    cfg = RunConfig(**changed)
    # Execute
    s = settings_from_config(cfg, num_clusters=1)
    # Assert
    for f in tagged_fields():
        if f.name != "num_clusters":
            assert getattr(s, f.metadata["setting"]) == getattr(cfg, f.name), f.name
    assert s.num_clusters == 1


@pytest.mark.parametrize(
    "field, value",
    [
        ("num_clusters", 0),
        ("num_clusters", 2.5),
        ("synth_batch", 1),
        ("bn_reduction", "max"),
        ("ensemble", "median"),
        ("val_fraction", 1.0),
        ("noise_momentum", 1.5),
        ("noise_teacher_mode", "both"),
        ("hypergrad_normalisation", "l1"),
        ("weights_mode", "random"),
        ("student_momentum", 1.0),
        ("tau", 0.0),
        ("cluster_on", "pacfl"),
        ("compile", "yes"),
        ("label_chunk", 0),
    ],
)
def test_invalid_values_raise_naming_the_field(field, value):
    # Execute / Assert
    with pytest.raises(ValueError, match=field):
        FedBiCrossSettings(**{field: value})


def test_choices_and_ranges_are_the_run_configs():
    # The settings accept exactly what the run config accepts (one definition, config.py)
    for choice in CLUSTER_ON:
        assert FedBiCrossSettings(cluster_on=choice).cluster_on == choice
    assert FedBiCrossSettings(jitter=8).jitter == 8
    with pytest.raises(ValueError, match="jitter"):
        FedBiCrossSettings(jitter=9)  # run-config range of `jitter`: [0, 8]
    with pytest.raises(ValueError, match="divisor"):
        FedBiCrossSettings().with_overrides(synth_batch=10, kd_batch=4)
