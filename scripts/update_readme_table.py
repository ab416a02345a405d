"""Regenerate what mirrors fedbicross_flwr/config.py: the README run-config table and the
``[tool.flwr.app.config]`` section of pyproject.toml (the last section of the file).

Run after adding, removing or changing a run-config key:  python scripts/update_readme_table.py
"""

from pathlib import Path

import tomli_w

from fedbicross_flwr.config import RunConfig, markdown_table

root = Path(__file__).resolve().parent.parent

readme = root / "README.md"
text = readme.read_text()
head, rest = text.split("<!-- config-table:start -->")
_, tail = rest.split("<!-- config-table:end -->")
readme.write_text(f"{head}<!-- config-table:start -->\n{markdown_table()}\n"
                  f"<!-- config-table:end -->{tail}")
print(f"updated {readme}")

pyproject = root / "pyproject.toml"
marker = "[tool.flwr.app.config]\n"
head, _ = pyproject.read_text().split(marker)
section = tomli_w.dumps(RunConfig().to_run_config())
pyproject.write_text(f"{head}{marker}{section}")
print(f"updated {pyproject}")
