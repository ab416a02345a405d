"""Run-config parsing and validation."""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path

import pytest

from fedbicross_flwr.config.run_config import ConfigError, RunConfig, load_preset, parse_overrides

ROOT = Path(__file__).resolve().parent.parent


def test_defaults_follow_the_paper() -> None:
    cfg = RunConfig()
    assert (cfg.local_epochs, cfg.local_lr, cfg.batch_size) == (100, 1e-3, 128)
    assert (cfg.pers_epochs, cfg.pers_gamma, cfg.pers_delta) == (10, 0.5, 0.3)
    assert (cfg.synth_steps, cfg.synth_batch, cfg.synth_lr) == (500, 256, 0.05)
    assert (cfg.tv_weight, cfg.bn_weight, cfg.kd_temperature) == (2.5e-5, 10.0, 20.0)
    assert (cfg.noise_samples, cfg.noise_momentum) == (256, 0.9)


def test_pyproject_lists_every_key_with_the_dataclass_default() -> None:
    with (ROOT / "pyproject.toml").open("rb") as fh:
        table = tomllib.load(fh)["tool"]["flwr"]["app"]["config"]
    assert table == RunConfig().to_run_config()


@pytest.mark.parametrize("preset", sorted(p for p in (ROOT / "conf").glob("*.toml")
                                           if not p.name.startswith("grid-")),
                         ids=lambda p: p.stem)  # grid presets: tests/test_harness.py
def test_presets_are_valid(preset: Path) -> None:
    values = load_preset(preset)
    RunConfig.from_run_config(values)  # raises on any bad key/value


@pytest.mark.parametrize("key,value,fragment", [
    ("alpha", 0.0, "'alpha' must be in (0"),
    ("alpha", -1.0, "'alpha'"),
    ("local-epochs", 0, "'local-epochs' must be in [1"),
    ("val-fraction", 0.9, "'val-fraction' must be in [0, 0.5]"),
    ("method", "fedprox9", "'method' must be one of"),
    ("device", "tpu", "'device'"),
    ("local-epochs", 1.5, "must be an integer"),
    ("progress", "yes", "must be a boolean"),
    ("output-dir", "relative/path", "absolute"),
    ("no-such-key", 1, "unknown run-config key"),
])
def test_bad_values_name_the_key(key: str, value: object, fragment: str) -> None:
    with pytest.raises(ConfigError, match=None) as err:
        RunConfig.from_run_config({key: value})
    assert fragment in str(err.value)


def test_cross_key_checks() -> None:
    with pytest.raises(ConfigError, match="num-clusters=6 must be <= num-clients=5"):
        RunConfig.from_run_config({"num-clusters": 6, "num-clients": 5})
    with pytest.raises(ConfigError, match="min-clients=4 exceeds"):
        RunConfig.from_run_config({"min-clients": 4, "num-clients": 3})
    with pytest.raises(ConfigError, match="needs data-path"):
        RunConfig.from_run_config({"dataset": "custom"})


def test_round_trip_and_overrides() -> None:
    values = parse_overrides("dataset='digits' alpha=0.5 local-epochs=3 progress=false")
    assert values == {"dataset": "digits", "alpha": 0.5, "local-epochs": 3, "progress": False}
    cfg = RunConfig.from_run_config(values)
    assert cfg.alpha == 0.5 and cfg.local_epochs == 3
    assert RunConfig.from_run_config(cfg.to_run_config()) == cfg
    assert dataclasses.is_dataclass(cfg)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.alpha = 1.0  # type: ignore[misc]
