"""The site's pin file: what ``fedbicross_flwr.deploy.supernode_gate`` accepts (the refusal of an
unpinned app at a real SuperNode is in tests/test_deploy_loopback.py).
"""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fedbicross_flwr.deploy.supernode_gate import app_sha256, main, read_pins

ROOT = Path(__file__).resolve().parent.parent
A, B = "a" * 64, "0123456789abcdef" * 4


def test_pins_are_sha256_lines_with_comments(tmp_path) -> None:
    path = tmp_path / "pins.txt"
    path.write_text(f"# reviewed 2026-12-01\n{A}\n\n  {B.upper()}  # v2\n")
    assert read_pins(path) == {A, B}


@pytest.mark.parametrize(("text", "message"), [
    ("# nothing\n", "pins no app"),
    (f"{A[:-1]}\n", "is not a sha256"),
    (f"{A} {B}\n", "is not a sha256"),
])
def test_a_bad_pin_file_is_refused(tmp_path, text, message) -> None:
    path = tmp_path / "pins.txt"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        read_pins(path)


def test_the_gate_will_not_start_without_a_usable_pin_file(tmp_path, capsys) -> None:
    with pytest.raises(SystemExit) as stop:
        main(["--superlink", "127.0.0.1:9093"])
    assert stop.value.code == 2 and "--pinned-apps FILE is required" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--pinned-apps", str(tmp_path / "missing.txt")])
    assert "cannot be read" in capsys.readouterr().err


def test_the_hash_is_that_of_the_bundle_flwr_run_builds() -> None:
    from flwr.cli.build import build_fab_from_disk

    assert app_sha256(ROOT) == hashlib.sha256(build_fab_from_disk(ROOT)).hexdigest()
    assert app_sha256(ROOT) == app_sha256(ROOT)  # Flower builds bundles deterministically


@pytest.fixture
def flower_supernode(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """Flower's ``flower-supernode`` entry point, replaced: records the arguments it got."""
    import importlib

    import flwr.supernode.start_client_internal as supernode

    # the module (its package exports a function of the same name)
    flower = importlib.import_module("flwr.supernode.cli.flower_supernode")
    flower = sys.modules["flwr.supernode.cli.flower_supernode"]
    started: list[list[str]] = []
    monkeypatch.setattr(flower, "flower_supernode", lambda: started.append(sys.argv[1:]))
    monkeypatch.setattr(supernode, "_pull_and_store_message", supernode._pull_and_store_message)
    monkeypatch.setattr(supernode, "_verify_fab", supernode._verify_fab)
    return started


@pytest.mark.parametrize(("args", "message"), [
    (["--pinned-apps", ""], "--pinned-apps is empty"),
    (["--pinned-apps="], "--pinned-apps is empty"),
    (["--pinned-apps"], "--pinned-apps FILE is required"),
    (["--pinned-apps", "PINS", "--allow-any-app"], "not both"),
])
def test_an_empty_or_contradictory_pin_argument_is_refused(tmp_path, capsys, flower_supernode,
                                                           args, message) -> None:
    pins = tmp_path / "pins.txt"
    pins.write_text(f"{A}\n")
    with pytest.raises(SystemExit) as stop:
        main([str(pins) if a == "PINS" else a for a in args] + ["--superlink", "127.0.0.1:1"])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert flower_supernode == []


def test_allow_any_app_starts_an_unpinned_supernode_and_says_so(flower_supernode,
                                                               caplog) -> None:
    import flwr.supernode.start_client_internal as supernode

    unpinned = supernode._pull_and_store_message
    with caplog.at_level(logging.WARNING):
        main(["--allow-any-app", "--superlink", "127.0.0.1:1", "--insecure"])
    assert flower_supernode == [["--superlink", "127.0.0.1:1", "--insecure"]]
    assert supernode._pull_and_store_message is unpinned  # nothing pinned
    assert any("runs ANY app bundle" in r.getMessage() and "--allow-any-app" in r.getMessage()
               for r in caplog.records)


SCRIPT = ROOT / "deploy" / "start_supernode.sh"
SITE_ARGS = ["127.0.0.1:1", "ca.crt", "key", "/data/site0.npz", "0", "out"]


def start_script(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    """``deploy/start_supernode.sh`` in ``tmp_path``; a SuperNode it starts (none must) would
    try to reach port 1 until the timeout.
    """
    base = {k: v for k, v in os.environ.items() if k != "PINNED_APPS"}
    base |= {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
             "PYTHON": sys.executable, "PYTHONPATH": str(ROOT)}
    return subprocess.run(["bash", str(SCRIPT), *args, *SITE_ARGS], cwd=tmp_path,
                          env={**base, **env}, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("env", [{}, {"PINNED_APPS": ""}, {"PINNED_APPS": "  "}],
                         ids=["unset", "empty", "blank"])
def test_the_script_refuses_to_start_without_pins(tmp_path, env) -> None:
    out = start_script(tmp_path, **env)
    assert out.returncode == 2, out
    assert "PINNED_APPS is not set" in out.stderr and "--allow-any-app" in out.stderr
    assert not (tmp_path / "out").exists()  # refused before anything was set up


def test_the_script_refuses_a_malformed_pin_file_and_a_contradiction(tmp_path) -> None:
    pins = tmp_path / "pins.txt"
    pins.write_text("not-a-sha\n")
    out = start_script(tmp_path, PINNED_APPS=str(pins))
    assert out.returncode == 2 and "is not a sha256" in out.stderr, out
    pins.write_text(f"{A}\n")
    out = start_script(tmp_path, "--allow-any-app", PINNED_APPS=str(pins))
    assert out.returncode == 2 and "not both" in out.stderr, out
