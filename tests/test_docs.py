"""The README documents every run-config key exactly as the code defines it."""

from __future__ import annotations

from pathlib import Path

from fedbicross_flwr.config import markdown_table

ROOT = Path(__file__).resolve().parent.parent


def test_readme_config_table_is_current() -> None:
    readme = (ROOT / "README.md").read_text()
    start = readme.index("<!-- config-table:start -->") + len("<!-- config-table:start -->")
    end = readme.index("<!-- config-table:end -->")
    assert readme[start:end].strip() == markdown_table(), (
        "README run-config table is stale: regenerate it with `fedbicross config-table`")
