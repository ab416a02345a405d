"""No function of the project is over 100 lines (read with :mod:`ast`, docstring included)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("fedbicross_flwr", "server_app", "client_app")
MAX_LINES = 100


def function_lengths(root: Path) -> dict[str, int]:
    """``path:line name`` -> lines from ``def`` to the function's last line, nested ones too."""
    lengths = {}
    for pkg in PACKAGES:
        for path in sorted((root / pkg).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    where = f"{path.relative_to(root)}:{node.lineno} {node.name}"
                    lengths[where] = node.end_lineno - node.lineno + 1
    return lengths


def test_no_function_is_over_100_lines() -> None:
    lengths = function_lengths(ROOT)
    assert len(lengths) > 400  # the walk saw the package
    too_long = {where: n for where, n in lengths.items() if n > MAX_LINES}
    assert not too_long, too_long


def test_the_length_counts_from_def_to_the_last_line(tmp_path: Path) -> None:
    for pkg in PACKAGES:
        (tmp_path / pkg).mkdir()
    body = "".join(f"    x{i} = {i}\n" for i in range(MAX_LINES))  # 100 lines + the def
    (tmp_path / "fedbicross_flwr" / "long.py").write_text(
        f"def short():\n    return 1\n\n\ndef long():\n{body}")
    assert function_lengths(tmp_path) == {"fedbicross_flwr/long.py:1 short": 2,
                                          "fedbicross_flwr/long.py:5 long": MAX_LINES + 1}
