"""The catalog of methods: the only list of them, torch-free, and every spec resolves."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from fedbicross_flwr.config.run_config import ConfigError, RunConfig
from fedbicross_flwr.methods import get_method
from fedbicross_flwr.methods.catalog import (
    CATALOG,
    MethodSpec,
    method_names,
    method_spec,
    register,
    table_rows,
)

METHODS = Path(__file__).resolve().parents[1] / "fedbicross_flwr" / "methods"


def test_every_spec_names_a_function_of_its_module() -> None:
    for name in CATALOG:
        assert callable(get_method(name)), name
    # phase 2 of every Flower strategy row sends the strategy's aggregate of round R
    assert get_method("fedprox-r") is get_method("fedavg-r") is get_method("krum-r")


def test_every_method_module_is_in_the_catalog() -> None:
    # every module of methods/ (and baselines/) that defines a method has a spec pointing to it
    modules = {s.function.split(":")[0] for s in CATALOG.values()}
    helpers = {"base", "catalog", "baselines.common", "baselines.config", "baselines.generator",
               "flower_strategies"}  # the table of Flower strategies; rounds.py drives them
    found = {p.relative_to(METHODS).with_suffix("").as_posix().replace("/", ".")
             for p in METHODS.rglob("*.py") if p.name != "__init__.py"}
    assert found - helpers == modules


def test_the_catalog_answers_what_the_project_asks() -> None:
    flower = ("fedavg-r", "fedprox-r", "fedavgm-r", "fedadagrad-r", "fedadam-r", "fedyogi-r",
              "qfedavg-r", "fedmedian-r", "fedtrimmedavg-r", "krum-r", "multikrum-r",
              "bulyan-r", "dp-fixed-server-r", "dp-fixed-client-r", "dp-adaptive-server-r",
              "dp-adaptive-client-r")
    assert method_names() == ("fedavg1", "local", "fedbicross", "central", "fedisca", "dense",
                              "coboosting", "dafl", "cluster-fedavg") + flower
    assert method_names(distils=True) == ("fedbicross", "fedisca", "dense", "coboosting", "dafl")
    assert method_names(kind="multi-round") == flower
    assert method_spec("krum-r").strategy == "Krum"
    assert table_rows("baseline") == ("fedavg1", "dafl", "dense", "fedisca", "coboosting",
                                      "cluster-fedavg")
    assert table_rows("reference") == ("local",) + flower + ("central",)
    assert [method_spec(m).teacher_ensemble for m in method_names(distils=True)] == [
        "config", "config", "logit", "logit", "logit"]


def test_unknown_and_repeated_names_are_refused() -> None:
    with pytest.raises(KeyError, match="unknown method 'fedbicros'"):
        method_spec("fedbicros")
    with pytest.raises(ValueError, match="already registered"):
        register(MethodSpec("local", "reference", "reference", 0, "local:local"))
    with pytest.raises(ConfigError, match="unknown method 'fedbicros'"):
        RunConfig(methods="local,fedbicros")


def test_config_validation_fails_on_a_typo_without_importing_torch() -> None:
    # the run config and every section of it (each beside its method) stay torch-free
    code = ("import sys\nfrom fedbicross_flwr.config.run_config import ConfigError, RunConfig\n"
            "import fedbicross_flwr.fedbicross.config, fedbicross_flwr.distill.config\n"
            "import fedbicross_flwr.methods.baselines.config\n"
            "try:\n    RunConfig.from_run_config({'method': 'fedbicros'})\n"
            "except ConfigError as err:\n    print('refused', 'torch' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "refused False"
