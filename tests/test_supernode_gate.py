"""The site's pin file: what ``fedbicross_flwr.deploy.supernode_gate`` accepts (the refusal of an
unpinned app at a real SuperNode is in tests/test_deploy_loopback.py).
"""

from __future__ import annotations

import hashlib
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
