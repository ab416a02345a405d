"""Regenerate the run-config table in README.md from fedbicross_flwr/config.py."""

from pathlib import Path

from fedbicross_flwr.config import markdown_table

readme = Path(__file__).resolve().parent.parent / "README.md"
text = readme.read_text()
head, rest = text.split("<!-- config-table:start -->")
_, tail = rest.split("<!-- config-table:end -->")
readme.write_text(f"{head}<!-- config-table:start -->\n{markdown_table()}\n"
                  f"<!-- config-table:end -->{tail}")
print(f"updated {readme}")
