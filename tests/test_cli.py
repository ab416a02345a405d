"""The command line: config table and configuration errors before any work."""

from __future__ import annotations

from fedbicross_flwr.cli import main
from fedbicross_flwr.config.run_config import RunConfig, markdown_table, tomllib


def test_config_table(capsys) -> None:
    assert main(["config-table"]) == 0
    assert capsys.readouterr().out.strip() == markdown_table()


def test_config_table_write_regenerates_readme_table_and_pyproject_defaults(tmp_path,
                                                                          capsys) -> None:
    # Prepare: a stale table between the markers, a stale default, text around both kept
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "CONFIG.md").write_text("# Title\n<!-- config-table:start -->\n"
                                                 "| old |\n<!-- config-table:end -->\n## After\n")
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "x"\n\n'
                                             '[tool.flwr.app.config]\nalpha = 7.0\n')
    # Execute
    assert main(["config-table", "--write", "--root", str(tmp_path)]) == 0
    # Assert
    readme = (tmp_path / "docs" / "CONFIG.md").read_text()
    assert readme == (f"# Title\n<!-- config-table:start -->\n{markdown_table()}\n"
                      "<!-- config-table:end -->\n## After\n")
    pyproject = tomllib.loads((tmp_path / "pyproject.toml").read_text())
    assert pyproject["project"] == {"name": "x"}
    assert pyproject["tool"]["flwr"]["app"]["config"] == RunConfig().to_run_config()
    assert "updated" in capsys.readouterr().out


def test_config_table_write_refuses_a_readme_without_markers(tmp_path, capsys) -> None:
    # Prepare
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "CONFIG.md").write_text("# no markers\n")
    (tmp_path / "pyproject.toml").write_text("[tool.flwr.app.config]\nalpha = 7.0\n")
    # Execute / Assert: one line, exit 2, nothing written
    assert main(["config-table", "--write", "--root", str(tmp_path)]) == 2
    assert "config-table:start" in capsys.readouterr().err
    assert (tmp_path / "pyproject.toml").read_text() == "[tool.flwr.app.config]\nalpha = 7.0\n"


def test_bad_value_fails_fast_with_exit_code_2(capsys) -> None:
    assert main(["run", "--run-config", "alpha=-1"]) == 2
    assert "'alpha' must be in (0" in capsys.readouterr().err
    assert main(["run", "--methods", "fedavg1,nope"]) == 2
    assert "'methods': unknown method 'nope'; known: fedavg1, local" in capsys.readouterr().err
