"""The docs describe the code as it is: the key table, the methods table and every link."""

from __future__ import annotations

import re
from pathlib import Path

from fedbicross_flwr.config.run_config import markdown_table
from fedbicross_flwr.methods.catalog import CATALOG

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def between(text: str, name: str) -> str:
    """The text between ``<!-- name:start -->`` and ``<!-- name:end -->``."""
    start = text.index(f"<!-- {name}:start -->") + len(f"<!-- {name}:start -->")
    return text[start:text.index(f"<!-- {name}:end -->")].strip()


def test_config_doc_table_is_current() -> None:
    text = (ROOT / "docs" / "CONFIG.md").read_text()
    assert between(text, "config-table") == markdown_table(), (
        "docs/CONFIG.md's run-config table is stale: regenerate it with "
        "`fedbicross config-table --write`")


def test_readme_methods_table_names_every_catalog_method_with_its_kind() -> None:
    rows = between((ROOT / "README.md").read_text(), "methods-table").splitlines()[2:]
    table = {}
    for row in rows:
        names, kind = (cell.strip() for cell in row.strip("|").split("|")[:2])
        for name in names.split(","):  # a row may name several methods of one kind
            table[name.strip().strip("`")] = kind
    assert table == {name: spec.kind for name, spec in CATALOG.items()}


def test_every_relative_link_of_the_docs_resolves() -> None:
    broken = []
    for doc in DOCS:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", doc.read_text()):
            if re.match(r"[a-z]+://", target):
                continue
            if not (doc.parent / target).exists():
                broken.append(f"{doc.relative_to(ROOT)} -> {target}")
    assert not broken, broken


def test_docs_name_no_path_of_a_development_machine() -> None:
    for doc in DOCS:
        assert not re.search(r"(?<![\w.])/(work|home|root|Users)/", doc.read_text()), doc.name


def test_readme_layout_names_every_module_and_subpackage_of_the_root() -> None:
    text = (ROOT / "README.md").read_text()
    block = text.split("## Layout", 1)[1].split("```", 2)[1]
    named = {line.split()[0] for line in block.splitlines() if line.startswith("  ")
             and not line.startswith("   ")}
    package = ROOT / "fedbicross_flwr"
    actual = {p.name for p in package.glob("*.py") if p.name != "__init__.py"}
    actual |= {f"{p.name}/" for p in package.iterdir() if p.is_dir()
               and (p / "__init__.py").is_file() or p.name == "assets"}
    assert named == actual
    top = {line.split()[0] for line in block.splitlines() if line and not line.startswith(" ")}
    for entry in top:
        assert (ROOT / entry).exists(), entry
