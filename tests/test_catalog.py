"""The catalog of methods: the only list of them, torch-free, and every spec resolves."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from fedbicross_flwr.config.run_config import ConfigError, RunConfig
from fedbicross_flwr.methods.catalog import (
    CATALOG,
    MethodSpec,
    method_names,
    method_spec,
    register,
    table_rows,
)

METHODS = Path(__file__).resolve().parents[1] / "fedbicross_flwr" / "methods"


def test_every_method_runs_through_exactly_one_imported_function() -> None:
    from fedbicross_flwr.methods.flower_strategies import BY_METHOD as ROUNDS
    from fedbicross_flwr.server import REFERENCES
    from fedbicross_flwr.strategies import BY_METHOD as ONE_SHOT

    # Assert: a one-shot method through its strategy, a multi-round one through flower_r, a
    # reference through the server's table; every name in exactly one, and nothing else there
    ways = {name: [table for table, names in (("one-shot", ONE_SHOT), ("multi-round", ROUNDS),
                                               ("reference", REFERENCES)) if name in names]
            for name in CATALOG}
    assert ways == {name: [spec.kind] for name, spec in CATALOG.items()}
    assert set(ONE_SHOT) | set(ROUNDS) | set(REFERENCES) == set(CATALOG)
    assert all(callable(f) for f in REFERENCES.values())


def test_every_method_module_is_reached_by_an_import() -> None:
    # every module of methods/ (and baselines/) that defines a method is imported by the
    # strategy or the server that runs it (no module is found by its name)
    import ast

    root = METHODS.parents[1]
    users = [root / "fedbicross_flwr" / "server.py",
             *sorted((root / "fedbicross_flwr" / "strategies").glob("*.py"))]
    imported = set()
    for path in users:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(
                    "fedbicross_flwr.methods."):
                imported.add(node.module.removeprefix("fedbicross_flwr.methods."))
    helpers = {"base", "catalog", "baselines.common", "baselines.config", "baselines.generator",
               "flower_strategies"}  # the table of Flower strategies; rounds.py drives them
    found = {p.relative_to(METHODS).with_suffix("").as_posix().replace("/", ".")
             for p in METHODS.rglob("*.py") if p.name != "__init__.py"}
    assert found - helpers <= imported, sorted(found - helpers - imported)


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
        register(MethodSpec("local", "reference", "reference", 0))
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
