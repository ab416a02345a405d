"""A full disk while a result file is written leaves the earlier file (or none), never a part of
one, and a run whose ``summary.json`` was never completed resumes instead of being refused.

The full disk is simulated where the bytes are written: every file opened for writing through
:class:`pathlib.Path` accepts a few bytes, then fails with ``ENOSPC`` as a full disk does.
"""

from __future__ import annotations

import errno
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import tomli_w

from fedbicross_flwr.cli import error_line, is_user_error, main
from fedbicross_flwr.config.run_config import RunConfig
from fedbicross_flwr.experiments.harness.collect import write_cells_csv
from fedbicross_flwr.experiments.harness.report import write_report
from fedbicross_flwr.experiments.harness.runner import is_finished
from fedbicross_flwr.experiments.harness.spec import load_grid_preset
from fedbicross_flwr.reports.comparison import write_comparison
from fedbicross_flwr.reports.results import (
    create_run_dir,
    finished_run_dir,
    write_clients_csv,
    write_summary_md,
)
from fedbicross_flwr.storage.atomic import WriteError, save_figure, write_json

OLD = "the earlier, complete file\n"
SUMMARY = {"method": "fedavg1", "dataset": "digits", "alpha": 1.0, "seed": 0,
           "num-clients": 2, "num-completed": 2, "missing-partitions": [],
           "acc-after-mean": 0.5, "acc-before-mean": 0.4, "acc-personal-after-mean": 0.5,
           "acc-personal-before-mean": 0.4, "local-test-acc-mean": 0.3,
           "local-test-acc-personal-mean": 0.3, "paper-metric": 0.5, "majority-rate": 0.2}


class FullDisk:
    """A file open for writing that takes ``room`` bytes, then fails with ENOSPC."""

    def __init__(self, fh: Any, room: int) -> None:
        self.fh, self.room = fh, room

    def write(self, data: Any) -> int:
        if len(data) > self.room:
            self.fh.write(data[: self.room])
            self.fh.flush()
            self.room = 0
            raise OSError(errno.ENOSPC, "No space left on device")
        self.room -= len(data)
        return self.fh.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.fh, name)

    def __enter__(self) -> FullDisk:
        return self

    def __exit__(self, *exc: object) -> None:
        self.fh.close()

    def __iter__(self) -> Any:
        return iter(self.fh)


@pytest.fixture
def full_disk(monkeypatch: pytest.MonkeyPatch) -> Callable[[str], None]:
    """``full_disk(name)``: from now on, a file called ``name`` (or its temporary file) that
    is opened for writing through ``Path.open`` fills the disk after 10 bytes.
    """
    real_open = Path.open

    def fill(name: str) -> None:
        def open_(self: Path, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
            fh = real_open(self, mode, *args, **kwargs)
            full = any(c in mode for c in "wax") and self.name in (name, name + ".tmp")
            return FullDisk(fh, 10) if full else fh

        monkeypatch.setattr(Path, "open", open_)

    return fill


def _comparison(out: Path, fill: Callable[[], None]) -> None:
    runs = {}
    for method in ("fedavg1", "local"):
        (out / method).mkdir()
        (out / method / "summary.json").write_text(json.dumps(SUMMARY))
        runs[method] = out / method
    fill()
    write_comparison(out, runs)


def _tables(out: Path, fill: Callable[[], None]) -> None:
    preset = out / "grid.toml"
    preset.write_text(GRID)
    spec = load_grid_preset(preset)
    fill()
    write_report(spec, out)


def _simple(write: Callable[[Path], Any]) -> Callable[[Path, Callable[[], None]], Any]:
    def prepare_then_write(out: Path, fill: Callable[[], None]) -> Any:
        fill()
        return write(out)

    return prepare_then_write


GRID = ("[grid]\ndatasets = ['digits']\nalphas = [1.0]\nnum-clients = [2]\nseeds = [0]\n"
        "methods = ['local']\n")
# (file, how a run or a grid writes it into a folder, once ``fill()`` has filled the disk)
WRITERS: list[tuple[str, Callable[[Path, Callable[[], None]], Any]]] = [
    ("summary.json", _simple(lambda d: write_json(d / "summary.json", SUMMARY))),
    ("knowledge.json", _simple(lambda d: write_json(d / "knowledge.json", {"stages": {}}))),
    ("clients.csv", _simple(lambda d: write_clients_csv(d / "clients.csv", [
        {"partition-id": i, "status": "ok"} for i in range(2)]))),
    ("summary.md", _simple(lambda d: write_summary_md(d / "summary.md", SUMMARY,
                                                      "knowledge table"))),
    ("comparison.csv", _comparison),
    ("comparison.md", _comparison),
    ("cells.csv", _simple(lambda d: write_cells_csv(d / "cells.csv", [{"dataset": "digits"}]))),
    ("tables.md", _tables),
]


@pytest.mark.parametrize("name,write", WRITERS, ids=[w[0] for w in WRITERS])
def test_a_full_disk_keeps_the_earlier_file_whole(name, write, tmp_path, full_disk) -> None:
    # Prepare: the earlier, complete version of the file
    (tmp_path / name).write_text(OLD)
    # Execute: the disk fills while the new version is written
    with pytest.raises(WriteError) as caught:
        write(tmp_path, lambda: full_disk(name))
    # Assert: one line naming the file and its folder; the earlier file whole, no leftovers
    line = error_line(caught.value)
    assert is_user_error(caught.value) and "\n" not in line
    assert f"cannot write {name} in {tmp_path}: [Errno 28] No space left" in line
    assert f"the earlier {name} is kept" in line
    assert (tmp_path / name).read_text() == OLD
    assert not list(tmp_path.glob("*.tmp"))


def test_a_full_disk_leaves_no_file_where_there_was_none(tmp_path, full_disk) -> None:
    full_disk("summary.json")
    with pytest.raises(WriteError, match=r"no summary\.json was written"):
        write_json(tmp_path / "summary.json", SUMMARY)
    assert list(tmp_path.iterdir()) == []


def test_a_figure_is_written_whole_or_not_at_all(tmp_path) -> None:
    class Figure:
        def savefig(self, path: Path, format: str, **kwargs: Any) -> None:
            Path(path).write_bytes(b"\x89PNG half")
            raise OSError(errno.ENOSPC, "No space left on device")

    (tmp_path / "summary.png").write_bytes(b"old picture")
    with pytest.raises(WriteError, match=r"cannot write summary\.png in .*No space left"):
        save_figure(Figure(), tmp_path / "summary.png", dpi=110)
    assert (tmp_path / "summary.png").read_bytes() == b"old picture"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.png"]


def test_every_result_writer_goes_through_the_atomic_helper() -> None:
    # A writer added later without the helper would cut a result short on a full disk.
    root = Path(__file__).resolve().parents[1]
    raw = []
    for path in sorted((root / "fedbicross_flwr").rglob("*.py")):
        if path.name == "atomic.py":
            continue
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            code = line.split("#", 1)[0]
            if any(call in code for call in (".write_text(", ".savefig(", 'open("w"',
                                              'open("a"', "open('w'")):
                raw.append(f"{path.relative_to(root)}:{number}: {line.strip()}")
    assert raw == [], "\n".join(raw)


@pytest.mark.parametrize("content", [b"", b"{\"acc-after-mean\": 0.", b"[]", b"\xff\xfe"])
def test_a_run_folder_whose_summary_is_empty_or_cut_short_resumes(content, tmp_path) -> None:
    # Prepare: a run stopped while its summary.json was written (the old, non-atomic writer)
    cfg = RunConfig(output_dir=str(tmp_path), run_name="cut", resume=True)
    (tmp_path / "cut" / "checkpoints").mkdir(parents=True)
    (tmp_path / "cut" / "summary.json").write_bytes(content)
    # Execute / Assert: the folder is not finished: it is reused and resumed
    assert finished_run_dir(cfg) is None
    assert create_run_dir(cfg) == tmp_path / "cut"
    # ... and once a whole summary is there, it is finished (never overwritten)
    (tmp_path / "cut" / "summary.json").write_text(json.dumps(SUMMARY))
    assert finished_run_dir(cfg) == tmp_path / "cut"
    with pytest.raises(FileExistsError, match="already finished"):
        create_run_dir(cfg)


def test_a_grid_cell_whose_summary_is_empty_is_not_finished(tmp_path) -> None:
    preset = tmp_path / "grid.toml"
    preset.write_text(GRID)
    (cell,) = load_grid_preset(preset).cells()
    from fedbicross_flwr.experiments.harness.runner import run_dir_of

    run_dir_of(tmp_path, cell).mkdir(parents=True)
    (run_dir_of(tmp_path, cell) / "summary.json").write_bytes(b"")
    assert not is_finished(tmp_path, cell)
    (run_dir_of(tmp_path, cell) / "summary.json").write_text(json.dumps(SUMMARY))
    assert is_finished(tmp_path, cell)


def test_a_run_stopped_by_a_full_disk_at_summary_json_resumes(tiny_run_config, tmp_path,
                                                              monkeypatch, capsys) -> None:
    # Prepare: the disk is full when the run's summary.json is written
    real_write = write_json

    def full_at_summary(path: Path, payload: Any) -> Path:
        if path.name == "summary.json":
            raise WriteError(f"cannot write summary.json in {path.parent}: [Errno 28] No "
                             "space left on device")
        return real_write(path, payload)

    import fedbicross_flwr.server as server

    monkeypatch.setattr(server, "write_json", full_at_summary)
    preset = tmp_path / "disk.toml"
    preset.write_text(tomli_w.dumps({**tiny_run_config, "method": "fedavg1", "run-name": "disk",
                                     "pers-epochs": 0}))
    # Execute: one line naming summary.json; the checkpoints are kept, no summary
    assert main(["run", "--preset", str(preset)]) == 1
    err = capsys.readouterr().err
    run_dir = Path(tiny_run_config["output-dir"]) / "disk"
    assert "cannot write summary.json in" in err and "Traceback" not in err
    assert not (run_dir / "summary.json").exists() and (run_dir / "checkpoints").is_dir()
    # A 0-byte summary.json, as the old writer left it, must not block the resume either
    (run_dir / "summary.json").write_bytes(b"")
    # Execute: space again; the same command with resume=true finishes in the same folder
    monkeypatch.setattr(server, "write_json", real_write)
    assert main(["run", "--preset", str(preset), "--run-config", "resume=true"]) == 0
    assert json.loads((run_dir / "summary.json").read_text())["method"] == "fedavg1"
