"""The run config is its sections: each key is declared once, next to its user, named by its field."""

import dataclasses

import pytest

from fedbicross_flwr.config.run_config import SECTIONS, RunConfig, markdown_table
from fedbicross_flwr.keys.errors import ConfigError
from fedbicross_flwr.keys.fields import Section, is_key, key, key_name


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


def test_a_section_is_never_read_from_a_config_without_its_keys():
    from fedbicross_flwr.fedbicross.config import FedBiCrossSettings
    from fedbicross_flwr.keys.sections import SharedConfig
    from fedbicross_flwr.methods.baselines.config import DAFLConfig

    shared = SharedConfig(num_clients=3)
    # Assert: the shared keys alone do not make a method's settings (no silent defaults)
    with pytest.raises(TypeError, match=r"DAFLConfig.of: the config \(SharedConfig\) has no "
                                        r"dafl_epochs, dafl_iterations, dafl_batch \.\.\."):
        DAFLConfig.of(shared)
    with pytest.raises(TypeError, match="FedBiCrossSettings.of"):
        FedBiCrossSettings.of(shared)
    # an override stands in for a missing key; an engineering constant is not a key to read
    s = FedBiCrossSettings.of(RunConfig(), num_clusters=1)
    assert (s.num_clusters, s.num_examples, s.label_chunk) == (1, 16, 8)


def test_a_multi_round_method_refuses_a_config_without_its_keys():
    from fedbicross_flwr.keys.sections import SharedConfig
    from fedbicross_flwr.methods.rounds import multi_round

    cfg = RunConfig(method="fedavg-r", rounds=3)
    assert multi_round(cfg) is cfg
    with pytest.raises(TypeError, match="fedavg-r is a multi-round method: its run needs the "
                                        "multi-round keys"):
        multi_round(SharedConfig(method="fedavg-r"))
