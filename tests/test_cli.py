"""The command line: config table and configuration errors before any work."""

from __future__ import annotations

from fedbicross_flwr.cli import main
from fedbicross_flwr.config import markdown_table


def test_config_table(capsys) -> None:
    assert main(["config-table"]) == 0
    assert capsys.readouterr().out.strip() == markdown_table()


def test_bad_value_fails_fast_with_exit_code_2(capsys) -> None:
    assert main(["run", "--run-config", "alpha=-1"]) == 2
    assert "'alpha' must be in (0" in capsys.readouterr().err
    assert main(["run", "--methods", "fedavg1,nope"]) == 2
    assert "'methods': unknown method 'nope'; known: fedavg1, local" in capsys.readouterr().err
