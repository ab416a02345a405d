"""FedBiCrossSettings: the FedBiCross section of the run config plus what the core also reads."""

import dataclasses
import typing

import pytest

from fedbicross_flwr.config.run_config import RunConfig
from fedbicross_flwr.distill.config import SynthesisConfig
from fedbicross_flwr.fedbicross.config import CLUSTER_ON, FedBiCrossConfig, FedBiCrossSettings
from fedbicross_flwr.keys.fields import key_name
from fedbicross_flwr.keys.sections import ExecutionConfig, TaskConfig

ENGINEERING = {"num_examples", "label_chunk"}  # not run-config keys


def test_defaults_are_the_papers_values():
    # Prepare / Execute
    s = FedBiCrossSettings()
    # Assert (paper Sec. IV-A)
    assert (s.num_clusters, s.noise_samples, s.synth_steps, s.synth_batch) == (2, 256, 500, 256)
    assert (s.synth_lr, s.tv_weight, s.bn_weight, s.kd_temperature) == (0.05, 2.5e-5, 10.0, 20.0)
    assert s.bilevel_val_fraction == 0.2
    assert s.noise_momentum == 0.9  # beta of Eq. 3: the weight of the old statistic
    assert s.noise_teacher_mode == "eval" and s.weights_mode == "bilevel"


def test_every_setting_is_a_run_config_key_of_the_same_name_and_default():
    # Prepare
    run_fields = {f.name: f for f in dataclasses.fields(RunConfig)}
    settings = [f for f in dataclasses.fields(FedBiCrossSettings) if f.name not in ENGINEERING]
    # Assert: one name per concept (the field is the key), same default and type
    assert not ENGINEERING & set(run_fields)
    for f in settings:
        assert f.name in run_fields, f.name
        assert key_name(run_fields[f.name]) == f.name.replace("_", "-")
        assert run_fields[f.name].default == f.default, f.name
        assert f.type in (type(f.default), type(f.default).__name__), f.name
    # the FedBiCross and synthesis sections plus the three shared keys, declared elsewhere
    own = {f.name for s in (FedBiCrossConfig, SynthesisConfig) for f in dataclasses.fields(s)}
    assert {f.name for f in settings} - own == {"seed", "precision", "compile", "compile_scope"}
    assert (FedBiCrossSettings().seed, FedBiCrossSettings().precision) == (
        TaskConfig().seed, ExecutionConfig().precision)


def test_the_type_checker_sees_the_fields():
    # A plain dataclass (no make_dataclass at import): its annotations are its fields
    hints = typing.get_type_hints(FedBiCrossSettings)
    assert list(hints) == [f.name for f in dataclasses.fields(FedBiCrossSettings)]
    assert hints["kd_temperature"] is float and hints["weights_mode"] is str


def test_of_copies_every_key_from_the_run_config():
    # Prepare: a non-default value for every key of the section that has room for one
    changed = {}
    for f in dataclasses.fields(FedBiCrossSettings):
        m = f.metadata
        if f.name in ENGINEERING or f.name in ("kd_batch", "num_clusters"):
            continue
        if m["choices"]:
            changed[f.name] = next(c for c in m["choices"] if c != f.default)
        elif isinstance(f.default, bool):
            changed[f.name] = not f.default
        elif isinstance(f.default, str):  # student-lr-milestones
            changed[f.name] = "0.25"
        else:
            changed[f.name] = f.default + 1 if isinstance(f.default, int) else f.default / 2
    cfg = RunConfig(**changed)
    # Execute
    s = FedBiCrossSettings.of(cfg, num_clusters=1)
    # Assert
    for name, value in changed.items():
        assert getattr(s, name) == value == getattr(cfg, name), name
    assert s.num_clusters == 1
    assert (s.num_examples, s.label_chunk) == (16, 8)  # engineering constants: defaults


@pytest.mark.parametrize(
    "field, value",
    [
        ("num_clusters", 0),
        ("num_clusters", 2.5),
        ("synth_batch", 1),
        ("bn_reduction", "max"),
        ("ensemble", "median"),
        ("bilevel_val_fraction", 1.0),
        ("noise_momentum", 1.5),
        ("noise_teacher_mode", "both"),
        ("hypergrad_norm", "l1"),
        ("weights_mode", "random"),
        ("student_momentum", 1.0),
        ("kd_temperature", 0.0),
        ("cluster_on", "pacfl"),
        ("compile", "yes"),
        ("compile_scope", "everything"),
        ("label_chunk", 0),
    ],
)
def test_invalid_values_raise_naming_the_key(field, value):
    # Execute / Assert
    with pytest.raises(ValueError, match=field.replace("_", "-")):
        FedBiCrossSettings(**{field: value})


def test_choices_and_ranges_are_the_run_configs():
    # The settings accept exactly what the run config accepts (one definition per key)
    for choice in CLUSTER_ON:
        assert FedBiCrossSettings(cluster_on=choice).cluster_on == choice
    assert FedBiCrossSettings(jitter=8).jitter == 8
    with pytest.raises(ValueError, match="jitter"):
        FedBiCrossSettings(jitter=9)  # run-config range of `jitter`: [0, 8]
    with pytest.raises(ValueError, match="divisor"):
        FedBiCrossSettings().with_overrides(synth_batch=10, kd_batch=4)
    with pytest.raises(ValueError, match="jitter"):
        RunConfig(jitter=9)
