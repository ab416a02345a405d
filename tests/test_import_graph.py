"""The package has no import cycle, counting imports inside functions and ``if`` blocks too.

The graph is read from the source with :mod:`ast` (no module is imported), over the project's
packages ``fedbicross_flwr``, ``server_app`` and ``client_app``. An edge A -> B means module A
names module B in an ``import`` or ``from ... import`` anywhere in its file. Importing a
submodule is not counted as an import of its parent package's ``__init__``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("fedbicross_flwr", "server_app", "client_app")


def project_modules(root: Path) -> dict[str, tuple[Path, bool]]:
    """Dotted module name -> (file, is a package ``__init__``)."""
    mods = {}
    for pkg in PACKAGES:
        for path in sorted((root / pkg).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            is_pkg = parts[-1] == "__init__"
            mods[".".join(parts[:-1] if is_pkg else parts)] = (path, is_pkg)
    return mods


def _resolve(name: str, mods: dict[str, tuple[Path, bool]]) -> str | None:
    """The longest project module that ``name`` (a module or a name inside one) refers to."""
    while name and name not in mods:
        name = name.rpartition(".")[0]
    return name or None


def import_graph(root: Path) -> dict[str, set[str]]:
    """Module -> the project modules it imports (every import statement in the file)."""
    mods = project_modules(root)
    graph: dict[str, set[str]] = {}
    for name, (path, is_pkg) in mods.items():
        package = name if is_pkg else name.rpartition(".")[0]
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: level 1 = this package, 2 = its parent, ...
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                # ``from pkg import sub`` imports the submodule; ``from mod import obj`` the module
                targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in mods else base
                           for alias in node.names]
            else:
                continue
            deps |= {dep for t in targets if (dep := _resolve(t, mods)) and dep != name}
        graph[name] = deps
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle ``[a, b, ..., a]`` of the directed graph, or None (iterative DFS)."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    for start in sorted(graph):
        if state.get(start):
            continue
        path, stack = [start], [iter(sorted(graph.get(start, ())))]
        state[start] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            elif not state.get(nxt):
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(graph.get(nxt, ()))))
    return None


def test_the_project_has_no_import_cycle() -> None:
    graph = import_graph(ROOT)
    assert len(graph) > 50  # the walk saw the package (not an empty folder)
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph) or [])


def test_the_graph_sees_imports_inside_functions_and_relative_imports() -> None:
    graph = import_graph(ROOT)
    # an import at the top of a package __init__
    assert "fedbicross_flwr.methods.catalog" in graph["fedbicross_flwr.methods"]
    # baselines use relative imports (``from ...distill.losses import kd_kl``)
    assert "fedbicross_flwr.distill.losses" in graph["fedbicross_flwr.methods.baselines.dafl"]
    # cli imports distill_check inside a function
    # (``from fedbicross_flwr.experiments import distill_check``)
    assert "fedbicross_flwr.experiments.distill_check" in graph["fedbicross_flwr.cli"]


def test_protocol_imports_nothing_from_the_package() -> None:
    assert import_graph(ROOT)["fedbicross_flwr.protocol"] == set()


def test_the_package_root_holds_few_modules_and_the_rest_by_concern() -> None:
    root_modules = sorted(p.name for p in (ROOT / "fedbicross_flwr").glob("*.py"))
    assert root_modules == ["__init__.py", "cli.py", "client.py", "logging_utils.py", "model.py",
                            "protocol.py", "server.py", "training.py"]
    subpackages = sorted(p.parent.name for p in (ROOT / "fedbicross_flwr").glob("*/__init__.py"))
    assert subpackages == ["config", "data", "deploy", "distill", "experiments", "fedbicross",
                           "keys", "methods", "privacy", "reports", "runners", "storage",
                           "strategies", "transports"]


ABOVE_THE_TRANSPORTS = ("fedbicross_flwr.server", "fedbicross_flwr.runners",
                        "fedbicross_flwr.strategies", "fedbicross_flwr.methods")


def imports_above_the_transports(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """Transport module -> what it imports from the server, runners, strategies or methods."""
    return {m: above for m in graph if m.startswith("fedbicross_flwr.transports")
            if (above := {d for d in graph[m] if d.startswith(ABOVE_THE_TRANSPORTS)})}


def test_the_transports_import_nothing_above_them() -> None:
    # the server calls the transports; the runners call the server: arrows point down only
    graph = import_graph(ROOT)
    assert len([m for m in graph if m.startswith("fedbicross_flwr.transports")]) >= 7
    assert imports_above_the_transports(graph) == {}


def test_the_transport_rule_fails_on_an_import_of_the_server(tmp_path: Path) -> None:
    # Prepare: a synthetic project whose transport imports the server inside a function
    pkg = tmp_path / "fedbicross_flwr"
    (pkg / "transports").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "server.py").write_text("")
    (pkg / "transports" / "__init__.py").write_text("")
    (pkg / "transports" / "direct.py").write_text(
        "def run():\n    from fedbicross_flwr.server import run_server\n")
    for other in PACKAGES[1:]:
        (tmp_path / other).mkdir()
    # Act
    found = imports_above_the_transports(import_graph(tmp_path))
    # Assert
    assert found == {"fedbicross_flwr.transports.direct": {"fedbicross_flwr.server"}}


BELOW_THE_RUN_CONFIG = ("fedbicross_flwr.keys", "fedbicross_flwr.methods", "fedbicross_flwr.fedbicross",
                        "fedbicross_flwr.distill", "fedbicross_flwr.data", "fedbicross_flwr.storage",
                        "fedbicross_flwr.transports", "fedbicross_flwr.training",
                        "fedbicross_flwr.client", "fedbicross_flwr.model",
                        "fedbicross_flwr.protocol")


def test_what_the_run_config_composes_reads_the_shared_keys_not_the_run_config() -> None:
    # config/ joins every method's section into RunConfig, so it stands above the methods;
    # below it a module reads keys.sections.SharedConfig or its own section
    graph = import_graph(ROOT)
    below = [m for m in graph if m.startswith(BELOW_THE_RUN_CONFIG)]
    assert len(below) >= 40
    upward = {m: sorted(d for d in graph[m] if d.startswith("fedbicross_flwr.config"))
              for m in below}
    assert {m: d for m, d in upward.items() if d} == {}
    # and the keys' foundation imports nothing of the package above it
    assert all(d.startswith("fedbicross_flwr.keys") for m in graph
               if m.startswith("fedbicross_flwr.keys") for d in graph[m])


SERVER_SIDE = ("fedbicross_flwr.server", "fedbicross_flwr.runners", "fedbicross_flwr.strategies",
               "fedbicross_flwr.methods", "fedbicross_flwr.reports", "fedbicross_flwr.config",
               "fedbicross_flwr.fedbicross", "fedbicross_flwr.distill", "server_app")


def test_the_server_side_does_not_import_the_client_module() -> None:
    # what a client does lives in client.py; w^(0), the seeds and the evaluation views that both
    # sides use live in model.py and training.py, so nothing on the server side imports it
    graph = import_graph(ROOT)
    assert len([m for m in graph if m.startswith(SERVER_SIDE)]) >= 60
    importers = sorted(m for m, deps in graph.items() if "fedbicross_flwr.client" in deps)
    assert [m for m in importers if m.startswith(SERVER_SIDE)] == []
    # the ClientApp and the two places that play the clients in one process
    assert importers == ["client_app.app", "fedbicross_flwr.privacy.personalized",
                         "fedbicross_flwr.transports.direct"]


def test_the_baselines_and_the_toolkit_do_not_import_the_papers_method() -> None:
    # fedbicross/ holds the paper's method alone: what the baselines share with it is in distill/
    graph = import_graph(ROOT)
    users = [m for m in graph if m.startswith(("fedbicross_flwr.methods.baselines",
                                              "fedbicross_flwr.distill"))]
    assert len(users) >= 12  # the baseline modules and the toolkit's modules
    for module in users:
        method_deps = {d for d in graph[module] if d.startswith("fedbicross_flwr.fedbicross")}
        assert not method_deps, f"{module} imports {sorted(method_deps)}"


@pytest.mark.parametrize("graph, expected", [
    ({"a": {"b"}, "b": {"c"}, "c": {"a"}}, ["a", "b", "c", "a"]),
    ({"a": {"b"}, "b": set(), "c": {"d"}, "d": {"c"}}, ["c", "d", "c"]),
    ({"a": {"a"}}, ["a", "a"]),
])
def test_the_cycle_finder_finds_a_cycle(graph, expected) -> None:
    assert find_cycle(graph) == expected


def test_the_cycle_finder_accepts_a_dag() -> None:
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set(), "d": {"a"}}) is None


def test_a_function_level_import_closes_a_cycle(tmp_path: Path, monkeypatch) -> None:
    # Prepare: a synthetic project where the cycle is hidden by an import inside a function
    pkg = tmp_path / "fedbicross_flwr"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "server.py").write_text("from fedbicross_flwr.methods import run\n")
    (pkg / "methods.py").write_text("def run():\n    from . import server\n")
    for other in PACKAGES[1:]:
        (tmp_path / other).mkdir()
    # Act
    cycle = find_cycle(import_graph(tmp_path))
    # Assert
    assert cycle == ["fedbicross_flwr.methods", "fedbicross_flwr.server",
                     "fedbicross_flwr.methods"]
