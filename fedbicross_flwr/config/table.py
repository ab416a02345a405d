"""What mirrors :mod:`fedbicross_flwr.config.run_config`: docs/CONFIG.md's key table and pyproject's defaults.

``fedbicross config-table`` prints the table; ``fedbicross config-table --write`` rewrites the
section of ``docs/CONFIG.md`` between ``<!-- config-table:start -->`` and ``<!-- config-table:end -->`` and the
``[tool.flwr.app.config]`` section of ``pyproject.toml`` (the last section of that file, which
Flower reads the keys and defaults from). Run it after adding, removing or changing a key.
"""

from __future__ import annotations

from pathlib import Path

from fedbicross_flwr.config.run_config import ConfigError, RunConfig, markdown_table
from fedbicross_flwr.storage.atomic import write_text

START, END = "<!-- config-table:start -->", "<!-- config-table:end -->"
TABLE_DOC = Path("docs") / "CONFIG.md"  # relative to the project folder
PYPROJECT_SECTION = "[tool.flwr.app.config]\n"


def readme_with_table(text: str) -> str:
    """``text`` with the table between the markers replaced by :func:`markdown_table`.

    Raises
    ------
    ConfigError
        The markers are missing, repeated or out of order.
    """
    if text.count(START) != 1 or text.count(END) != 1 or text.index(START) > text.index(END):
        raise ConfigError(f"{TABLE_DOC} needs one {START} line before one {END} line")
    head, rest = text.split(START)
    _, tail = rest.split(END)
    return f"{head}{START}\n{markdown_table()}\n{END}{tail}"


def pyproject_with_defaults(text: str) -> str:
    """``text`` with its last section, ``[tool.flwr.app.config]``, set to RunConfig's defaults.

    Raises
    ------
    ConfigError
        The section is missing or is not the last one.
    """
    import tomli_w

    if text.count(PYPROJECT_SECTION) != 1:
        raise ConfigError(f"pyproject.toml needs one {PYPROJECT_SECTION.strip()} section")
    head, section = text.split(PYPROJECT_SECTION)
    if "\n[" in section:
        raise ConfigError(f"{PYPROJECT_SECTION.strip()} must be the last section of "
                          "pyproject.toml")
    return f"{head}{PYPROJECT_SECTION}{tomli_w.dumps(RunConfig().to_run_config())}"


def write_mirrors(root: Path) -> list[Path]:
    """Rewrite ``root``/docs/CONFIG.md's table and ``root``/pyproject.toml's defaults; the files."""
    readme, pyproject = root / TABLE_DOC, root / "pyproject.toml"
    for path in (readme, pyproject):
        if not path.is_file():
            raise ConfigError(f"{path} does not exist (--root names the project folder)")
    new_readme = readme_with_table(readme.read_text())
    new_pyproject = pyproject_with_defaults(pyproject.read_text())
    write_text(readme, new_readme)  # both checked before either is written
    write_text(pyproject, new_pyproject)
    return [readme, pyproject]
