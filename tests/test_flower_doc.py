"""docs/FLOWER.md's ClientApp and ServerApp run as written, on an in-process Flower Grid.

The two code blocks are read from the page (between their ``<!-- flower-...:start/end -->``
markers) and executed unchanged, like a doctest; the page's ServerApp ``main`` then runs
against the page's ClientApp over three in-process nodes at tiny settings (tiny archive,
model width 4, T = 2, B = 8).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from flwr.app import Context, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID

from fedbicross_flwr.runners.inprocess import InProcessGrid
from tests.test_docs import between

PAGE = Path(__file__).resolve().parent.parent / "docs" / "FLOWER.md"


def code_block(name: str) -> str:
    """The Python code between the page's ``name`` markers, without its fence."""
    block = between(PAGE.read_text(), name)
    match = re.fullmatch(r"```python\n(.*)\n```", block, flags=re.DOTALL)
    assert match, f"the {name} block is not one fenced python block"
    return match.group(1)


def run_block(name: str, module: str) -> dict[str, Any]:
    """Execute a block as the module ``module``; its namespace."""
    namespace: dict[str, Any] = {"__name__": module}
    exec(compile(code_block(name), f"{PAGE.name}:{name}", "exec"), namespace)  # noqa: S102
    return namespace


def test_the_serverapp_of_the_page_is_about_thirty_lines() -> None:
    lines = [line for line in code_block("flower-serverapp").splitlines() if line.strip()]
    assert 25 <= len(lines) <= 40, len(lines)


def test_the_pages_serverapp_runs_fedbicross_against_fedavg_on_the_pages_clientapp(
        tiny_run_config, capsys) -> None:
    # Prepare: the page's two apps, a tiny run config of the project's keys
    client = run_block("flower-clientapp", "my_app.client")
    server = run_block("flower-serverapp", "my_app.server")
    run_config = {**tiny_run_config, "model-width": 4, "synth-steps": 2, "synth-batch": 8,
                  "noise-samples": 16, "num-clusters": 2}
    grid = InProcessGrid(client["app"], run_config, num_nodes=3)
    context = Context(run_id=1, node_id=SUPERLINK_NODE_ID, node_config={}, state=RecordDict(),
                      run_config=run_config)
    # Act
    server["main"](grid, context)
    # Assert: FedBiCross's round (3 uploads, 3 personalizations), then FedAvg's 3 rounds
    types = [m.metadata.message_type for m in grid.sent]
    assert types == ["train"] * 3 + ["train.personalize"] * 3 + ["train"] * 9
    assert not any(r.has_error() for r in grid.replies)
    assert all("server-round" in m.content["config"] for m in grid.sent[6:])  # FedAvg's
    assert not any("server-round" in m.content["config"] for m in grid.sent[:6])
    # Assert: the comparison it prints, accuracies in [0, 1]
    out = capsys.readouterr().out
    ours = re.search(r"FedBiCross, 1 round: test (\S+), after personalization (\S+)", out)
    theirs = re.search(r"FedAvg, 3 rounds: +test (\S+)", out)
    assert ours and theirs, out
    for value in (*ours.groups(), *theirs.groups()):
        assert 0.0 <= float(value) <= 1.0
