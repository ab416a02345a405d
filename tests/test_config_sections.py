"""The run config is its sections: each key is declared once, next to its user, named by its field."""

import dataclasses

import pytest

from fedbicross_flwr.config.errors import ConfigError
from fedbicross_flwr.config.fields import Section, is_key, key, key_name
from fedbicross_flwr.config.run_config import SECTIONS, RunConfig, markdown_table


def test_every_key_belongs_to_exactly_one_section_in_table_order():
    # Prepare
    owners: dict[str, list[str]] = {}
    for section in SECTIONS:
        for f in dataclasses.fields(section):
            owners.setdefault(f.name, []).append(section.__name__)
    run_fields = [f.name for f in dataclasses.fields(RunConfig)]
    # Assert: RunConfig is the sections' fields, in SECTIONS order, none declared twice
    assert run_fields == [f.name for s in SECTIONS for f in dataclasses.fields(s)]
    assert {n: o for n, o in owners.items() if len(o) > 1} == {}
    assert all(is_key(f) for f in dataclasses.fields(RunConfig))
    assert len(run_fields) >= 90
    # the table follows the same order
    table_keys = [row.split("`")[1] for row in markdown_table().splitlines()[2:]]
    assert table_keys == [n.replace("_", "-") for n in run_fields]


def test_a_key_is_its_field_name_in_kebab_case():
    # Prepare
    cfg = RunConfig.from_run_config({"kd-temperature": 4, "bilevel-val-fraction": 0.25,
                                     "noise-ema-cutoff": 0.0, "precision": "bf16"})
    # Assert: the fields have the keys' names, nothing is renamed on the way in
    assert (cfg.kd_temperature, cfg.bilevel_val_fraction, cfg.noise_ema_cutoff,
            cfg.precision) == (4.0, 0.25, 0.0, "bf16")
    assert isinstance(cfg.kd_temperature, float)
    assert set(cfg.to_run_config()) == {key_name(f) for f in dataclasses.fields(RunConfig)}
    assert RunConfig.from_run_config(cfg.to_run_config()) == cfg


def test_a_new_section_is_declared_in_one_place():
    # Prepare: a method's section of its own, declared once, as a small frozen dataclass
    @dataclasses.dataclass(frozen=True)
    class NewMethodConfig(Section):
        """A new method's keys."""

        new_knob: float = key(0.25, "A new knob.", low=0.0, high=1.0)

    @dataclasses.dataclass(frozen=True)
    class Extended(NewMethodConfig, RunConfig):
        """The run config with the new section."""

    # Execute
    cfg = Extended.from_run_config({"new-knob": 1, "seed": 3})
    # Assert: its key, default, range and coercion come from the one declaration
    assert (cfg.new_knob, cfg.seed, Extended().new_knob) == (1.0, 3, 0.25)
    assert NewMethodConfig.of(cfg) == NewMethodConfig(new_knob=1.0)
    with pytest.raises(ConfigError, match="'new-knob' must be in"):
        Extended.from_run_config({"new-knob": 1.5})
    with pytest.raises(ConfigError, match="unknown run-config key 'new-knobs'"):
        Extended.from_run_config({"new-knobs": 0.5})


def test_a_section_refuses_a_wrong_type_naming_the_key():
    from fedbicross_flwr.methods.baselines.config import DAFLConfig

    with pytest.raises(ConfigError, match="'dafl-epochs' must be an integer"):
        DAFLConfig(dafl_epochs=2.5)
    with pytest.raises(ConfigError, match="'dafl-gen-lr' must be a number"):
        DAFLConfig(dafl_gen_lr="fast")
    assert DAFLConfig.of(RunConfig(dafl_epochs=7)).dafl_epochs == 7
