"""Every bad input gives one readable line on stderr and a non-zero exit, before any training.

Table-driven: each case is a real bad input (archives written with numpy, real files and
folders) passed to the real ``fedbicross run`` entry point in this process. Training is
watched: if any case got as far as training a client, the test fails.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import tomli_w

import fedbicross_flwr.client as client_module
from fedbicross_flwr.cli import main
from tests.conftest import make_archive

# A valid tiny run: every case changes one thing.
BASE = {"dataset": "custom", "in-channels": 1, "num-classes": 3, "num-clients": 2,
        "alpha": 1.0, "min-partition-size": 5, "local-epochs": 1, "pers-epochs": 0,
        "batch-size": 8, "progress": False, "device": "cpu", "run-name": "bad"}


def archive(tmp: Path, change: Callable[[dict[str, np.ndarray]], None]) -> str:
    """A MedMNIST-format archive written with numpy after ``change`` edits its arrays."""
    with np.load(make_archive(tmp / "good.npz", n_train=20, n_val=4, n_test=9)) as npz:
        arrays = {k: npz[k] for k in npz.files}
    change(arrays)
    path = tmp / "bad.npz"
    np.savez(path, **arrays)
    return str(path)


def raw_file(tmp: Path, content: bytes) -> str:
    path = tmp / "bad.npz"
    path.write_bytes(content)
    return str(path)


def unwritable_dir(tmp: Path) -> str:
    """A folder that cannot be created: under a read-only folder, or (as root, who may write
    anywhere on a normal file system) under sysfs, which refuses new folders to everyone.
    """
    if os.geteuid() == 0:
        return "/sys/fedbicross-output"
    locked = tmp / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    return str(locked / "runs")


def a_file(tmp: Path) -> str:
    path = tmp / "a-file"
    path.write_text("not a folder")
    return str(path)


def set_(key: str, value: np.ndarray | None) -> Callable[[dict], None]:
    def change(arrays: dict) -> None:
        if value is None:
            del arrays[key]
        else:
            arrays[key] = value
    return change


LABELS = np.array([[0], [1], [2]] * 6 + [[0], [1]])  # 20 train labels of the good archive
# (id, run config changes given the tmp folder, a fragment the one line must contain)
CASES: list[tuple[str, Callable[[Path], dict], str]] = [
    ("unknown strategy argument", lambda t: {"method": "fedadam-r", "strategy-args": "etaa=1"},
     "FedAdam takes no argument 'etaa'"),
    ("strategy argument of the wrong type", lambda t: {
        "methods": "fedavg1,krum-r", "strategy-args": "num_malicious_nodes='two'"},
     "Krum's num_malicious_nodes: 'two' is a str, it takes int"),
    ("unknown dataset", lambda t: {"dataset": "nosuchmnist"}, "unknown dataset 'nosuchmnist'"),
    ("missing data folder", lambda t: {"dataset": "bloodmnist", "in-channels": 0,
                                       "num-classes": 0, "data-dir": str(t / "nope")},
     "MedMNIST archive not found"),
    ("missing archive", lambda t: {"data-path": str(t / "missing.npz")},
     "data archive not found"),
    ("truncated archive", lambda t: {"data-path": raw_file(
        t, Path(make_archive(t / "whole.npz")).read_bytes()[:300])}, "not an npz (zip) file"),
    ("garbage archive", lambda t: {"data-path": raw_file(t, b"garbage" * 50)},
     "not an npz (zip) file (350 bytes"),
    ("empty file", lambda t: {"data-path": raw_file(t, b"")}, "not an npz (zip) file (0 bytes"),
    ("archive without arrays", lambda t: {"data-path": archive(t, lambda a: a.clear())},
     "lacks 'train_images'/'train_labels'"),
    ("object-array archive", lambda t: {"data-path": archive(t, set_(
        "train_labels", np.array([[0], "one", None] * 6 + [[0], [1]], dtype=object)))},
     "cannot read data archive"),
    ("wrong image shape", lambda t: {"data-path": archive(t, set_(
        "train_images", np.zeros((20, 32, 32), np.uint8)))}, "expected (28, 28)"),
    ("non-uint8 images", lambda t: {"data-path": archive(t, set_(
        "train_images", np.zeros((20, 28, 28), np.float32)))}, "must be uint8, got float32"),
    ("labels out of range", lambda t: {"data-path": archive(t, set_(
        "train_labels", np.where(LABELS == 2, 7, LABELS)))}, "out of range [0, 3)"),
    ("negative labels", lambda t: {"data-path": archive(t, set_(
        "train_labels", np.where(LABELS == 2, -1, LABELS)))}, "(min -1"),
    ("NaN labels", lambda t: {"data-path": archive(t, set_(
        "train_labels", np.where(LABELS == 2, np.nan, LABELS)))}, "6 NaN or infinite value(s)"),
    ("fractional labels", lambda t: {"data-path": archive(t, set_(
        "train_labels", np.where(LABELS == 2, 1.5, LABELS)))}, "non-integer value(s) (e.g. 1.5)"),
    ("missing key", lambda t: {"data-path": archive(t, set_("test_labels", None))},
     "lacks 'test_images'/'test_labels'"),
    ("mismatched split sizes", lambda t: {"data-path": archive(t, set_(
        "train_labels", LABELS[:-1]))}, "train has 20 images but 19 labels"),
    ("in-channels the archive lacks", lambda t: {"in-channels": 3},
     "expected (28, 28, 3) for in-channels=3"),
    ("in-channels 2", lambda t: {"in-channels": 2}, "in-channels in {1, 3}"),
    ("in-channels out of range", lambda t: {"in-channels": 4},
     "'in-channels' must be in [0, 3]"),
    ("num-classes 1", lambda t: {"num-classes": 1}, "num-classes >= 2"),
    ("num-classes other than the dataset's", lambda t: {
        "dataset": "retinamnist", "in-channels": 3, "num-classes": 4},
     "num-classes=4 in the run config, but dataset 'retinamnist' has 5"),
    ("unwritable output folder", lambda t: {"output-dir": unwritable_dir(t)},
     "cannot be created or written"),
    ("output folder is a file", lambda t: {"output-dir": a_file(t)}, "is not a directory"),
    ("output folder under a file", lambda t: {"output-dir": a_file(t) + "/runs"},
     "cannot be created or written"),
    ("run-name leaving output-dir", lambda t: {"run-name": "../../escape"},
     "run-name must be one folder name inside output-dir"),
    ("absolute run-name", lambda t: {"run-name": str(t / "elsewhere")},
     "run-name must be one folder name inside output-dir"),
    ("methods naming no method", lambda t: {"methods": " , "}, "'methods' names no method"),
    ("strategy-args on a one-shot method", lambda t: {"method": "fedavg1",
                                                      "strategy-args": "eta=0.1"},
     "strategy-args is set, but method 'fedavg1' takes no strategy arguments"),
    ("malformed strategy-args on a one-shot method", lambda t: {"method": "local",
                                                                "strategy-args": "eta="},
     "strategy-args is set, but method 'local' takes no strategy arguments"),
    ("strategy-args on one-shot methods", lambda t: {"methods": "fedavg1,local",
                                                     "strategy-args": "eta=0.1"},
     "strategy-args is set, but methods 'fedavg1', 'local' take no strategy arguments"),
    ("run-name with a newline", lambda t: {"run-name": "two\nlines"},
     "run-name must hold no control character (newline, tab, ...), got 'two\\nlines'"),
    ("run-name with an escape", lambda t: {"run-name": "red\x1b[31m"},
     "run-name must hold no control character"),
    ("run-name with a tab", lambda t: {"run-name": "a\tb"},
     "run-name must hold no control character"),
    ("empty train split", lambda t: {"data-path": archive(t, lambda a: a.update(
        train_images=np.zeros((0, 28, 28), np.uint8), train_labels=np.zeros((0, 1), np.int64)))},
     "the training split is empty"),
    ("more clients than samples", lambda t: {"dataset": "digits", "in-channels": 0,
                                             "num-classes": 0, "num-clients": 2000},
     "cannot partition 1077 training samples into 2000 clients"),
    ("data-dir symlink loop", lambda t: {"dataset": "retinamnist", "in-channels": 0,
                                         "num-classes": 0, "data-dir": symlink_loop(t)},
     "cannot be resolved"),
    ("data-path a folder", lambda t: {"data-path": str(t)}, "is a folder, not an npz file"),
    ("data-path a FIFO", lambda t: {"data-path": fifo(t)}, "is a FIFO (named pipe)"),
    ("data-path a device", lambda t: {"data-path": "/dev/zero"},
     "is a character device, not an npz file"),
    ("archive declaring too much memory", lambda t: {"data-path": declaring(t, (10**12, 28))},
     "GiB of arrays (train_images: shape (1000000000000, 28)), more than"),
]


def symlink_loop(tmp: Path) -> str:
    (tmp / "loop-a").symlink_to(tmp / "loop-b")
    (tmp / "loop-b").symlink_to(tmp / "loop-a")
    return str(tmp / "loop-a")


def fifo(tmp: Path) -> str:
    os.mkfifo(tmp / "pipe.npz")
    return str(tmp / "pipe.npz")


def declaring(tmp: Path, shape: tuple[int, ...]) -> str:
    """An npz whose ``train_images`` header declares ``shape`` (uint8) over a few bytes."""
    import io
    import zipfile

    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "|u1", "fortran_order": False,
                                                  "shape": shape})
    path = tmp / "declaring.npz"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive_:
        archive_.writestr("train_images.npy", header.getvalue() + bytes(1000))
    return str(path)


@pytest.fixture
def no_training(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Records every client training that starts (there must be none)."""
    started: list[str] = []
    real = client_module.train_local

    def watched(*args, **kwargs):
        started.append("train_local")
        return real(*args, **kwargs)

    monkeypatch.setattr(client_module, "train_local", watched)
    return started


def one_line_error(capsys: pytest.CaptureFixture, argv: list[str]) -> tuple[int, str]:
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    return code, err


@pytest.mark.parametrize("case,changes,fragment", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_non_zero(case, changes, fragment, tmp_path, capsys,
                                            no_training) -> None:
    # Prepare: a preset that is the valid tiny run with this case's one change
    run = {**BASE, "data-path": str(make_archive(tmp_path / "site.npz", n_train=20)),
           "output-dir": str(tmp_path / "runs")}
    run.update(changes(tmp_path))
    preset = tmp_path / "preset.toml"
    preset.write_text(tomli_w.dumps(run))
    # Execute
    code, err = one_line_error(capsys, ["run", "--preset", str(preset)])
    # Assert: non-zero, one line naming the problem, and nothing was trained
    assert code != 0, case
    assert fragment in err, (case, err)
    assert no_training == [], case


def test_invalid_toml_preset(tmp_path, capsys) -> None:
    preset = tmp_path / "preset.toml"
    preset.write_text("method = \ndataset = 'digits'\n")
    code, err = one_line_error(capsys, ["run", "--preset", str(preset)])
    assert code == 2 and f"preset {preset} is not valid TOML" in err
    # the grid command reads its own presets: same rule
    code, err = one_line_error(capsys, ["grid", "--preset", str(preset), "--dry-run"])
    assert code == 2 and f"grid preset {preset} is not valid TOML" in err


@pytest.mark.parametrize("kind,make,fragment", [
    ("missing", lambda t: t / "nope.toml", "does not exist"),
    ("folder", lambda t: t, "is a folder, not a TOML file"),
    ("FIFO", lambda t: Path(fifo(t)), "is a FIFO (named pipe), not a TOML file"),
    ("device", lambda t: Path("/dev/zero"), "is a character device, not a TOML file"),
], ids=["missing", "folder", "FIFO", "device"])
@pytest.mark.parametrize("command", ["run", "grid"])
def test_a_preset_that_is_not_a_file_says_what_it_is(kind, make, fragment, command, tmp_path,
                                                     capsys) -> None:
    # Prepare: a preset path that is no regular file (a FIFO or /dev/zero must not be read:
    # reading would block or never end)
    path = make(tmp_path)
    argv = [command, "--preset", str(path)] + (["--dry-run"] if command == "grid" else [])
    # Execute
    code, err = one_line_error(capsys, argv)
    # Assert
    name = "grid preset" if command == "grid" else "preset"
    assert code == 2 and f"{name} {path} {fragment}" in err, err


@pytest.mark.parametrize("engine", ["direct", "apps"])
def test_custom_data_without_data_path_says_that_it_is_not_set(engine, tmp_path, capsys,
                                                               no_training) -> None:
    run = {**BASE, "output-dir": str(tmp_path / "runs")}  # no data-path
    preset = tmp_path / "preset.toml"
    preset.write_text(tomli_w.dumps(run))
    code, err = one_line_error(capsys, ["run", "--engine", engine, "--preset", str(preset)])
    assert code == 2 and "dataset='custom' but data-path is not set" in err, err
    assert "is a folder" not in err and no_training == []


def test_the_in_process_grid_engine_checks_the_data_first(tmp_path, capsys,
                                                          no_training) -> None:
    # Without the up-front check, each ClientApp would reply with an error and the run would
    # go on; the CLI must stop before any of it.
    run = {**BASE, "data-path": raw_file(tmp_path, b"garbage"),
           "output-dir": str(tmp_path / "runs")}
    preset = tmp_path / "preset.toml"
    preset.write_text(tomli_w.dumps(run))
    code, err = one_line_error(capsys, ["run", "--engine", "apps", "--preset", str(preset)])
    assert code == 1 and "not an npz (zip) file" in err and no_training == []
    assert not (tmp_path / "runs" / "bad").exists()


def test_debug_prints_the_traceback(tmp_path, capsys) -> None:
    run = {**BASE, "data-path": str(tmp_path / "missing.npz")}
    preset = tmp_path / "preset.toml"
    preset.write_text(tomli_w.dumps(run))
    assert main(["run", "--preset", str(preset), "--debug"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "DataError" in err
    assert err.strip().splitlines()[-1].startswith("error: data archive not found")
    assert main(["--debug", "run", "--preset", str(preset)]) == 1
    assert "Traceback" in capsys.readouterr().err


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has a GPU")
@pytest.mark.parametrize("engine", ["direct", "apps"])
def test_cuda_without_a_gpu_is_one_line_in_both_engines(engine, tmp_path, capsys,
                                                        no_training) -> None:
    run = {**BASE, "data-path": str(make_archive(tmp_path / "site.npz", n_train=20)),
           "output-dir": str(tmp_path / "runs"), "device": "cuda"}
    preset = tmp_path / "preset.toml"
    preset.write_text(tomli_w.dumps(run))
    code, err = one_line_error(capsys, ["run", "--engine", engine, "--preset", str(preset)])
    assert code == 2 and "device='cuda' but torch sees no CUDA device" in err
    assert no_training == []


def test_a_run_name_never_leaves_output_dir(tmp_path, capsys) -> None:
    run = {**BASE, "data-path": str(make_archive(tmp_path / "site.npz", n_train=20)),
           "output-dir": str(tmp_path / "a" / "b" / "runs"), "run-name": "../../escape"}
    preset = tmp_path / "preset.toml"
    preset.write_text(tomli_w.dumps(run))
    assert one_line_error(capsys, ["run", "--preset", str(preset)])[0] == 2
    assert not (tmp_path / "a" / "escape").exists() and not (tmp_path / "a").exists()


@pytest.mark.parametrize("engine", ["direct", "apps"])
def test_run_checks_the_methods_option_in_both_engines(engine, tmp_path, capsys,
                                                       no_training) -> None:
    run = {**BASE, "data-path": str(make_archive(tmp_path / "site.npz", n_train=20)),
           "output-dir": str(tmp_path / "runs")}
    preset = tmp_path / "preset.toml"
    preset.write_text(tomli_w.dumps(run))
    code, err = one_line_error(capsys, ["run", "--engine", engine, "--preset", str(preset),
                                        "--methods", "fedavg1,nosuch"])
    assert code == 2 and "unknown method 'nosuch'" in err, err
    assert no_training == [] and not (tmp_path / "runs" / "bad").exists()


def test_the_apps_engine_refuses_the_client_cache_option(tmp_path, capsys,
                                                         no_training) -> None:
    run = {**BASE, "data-path": str(make_archive(tmp_path / "site.npz", n_train=20)),
           "output-dir": str(tmp_path / "runs")}
    preset = tmp_path / "preset.toml"
    preset.write_text(tomli_w.dumps(run))
    code, err = one_line_error(capsys, ["run", "--engine", "apps", "--preset", str(preset),
                                        "--client-cache", str(tmp_path / "cache")])
    assert code == 2 and "--client-cache is for the direct engine" in err, err
    assert no_training == []


def test_bench_reports_a_bad_argument_on_stderr(capsys) -> None:
    assert main(["bench", "--clients", "-1"]) == 2
    out = capsys.readouterr()
    assert out.out == "" and out.err.startswith("configuration error: bench:")


def test_a_full_disk_while_checkpointing_is_one_line_and_leaves_no_partial_file(
        tmp_path, monkeypatch) -> None:
    import errno

    import torch

    from fedbicross_flwr.cli import error_line, is_user_error
    from fedbicross_flwr.storage import checkpoint_io

    def full_disk(obj, path):  # torch.save on a full disk: part of the file, then ENOSPC
        Path(path).write_bytes(b"\0" * 4096)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint_io.torch, "save", full_disk)
    with pytest.raises(checkpoint_io.CheckpointWriteError) as caught:
        checkpoint_io.save_plain({"w": torch.zeros(1024, 1024)}, tmp_path / "uploads.pt")
    line = error_line(caught.value)
    assert is_user_error(caught.value) and "\n" not in line
    assert f"cannot write uploads.pt in {tmp_path}: [Errno 28] No space left" in line
    assert "it needs about 4 MiB" in line and "rerun with resume=true" in line
    assert list(tmp_path.iterdir()) == []  # no uploads.pt.tmp left behind


def test_a_run_stopped_by_a_full_disk_at_uploads_pt_resumes(tiny_run_config, tmp_path,
                                                            monkeypatch, capsys) -> None:
    import errno

    from fedbicross_flwr.storage import checkpoint_io

    # Prepare: the disk is full when the phase-1 uploads are checkpointed
    real_save = checkpoint_io.torch.save

    def full_disk(obj, path):
        if Path(path).name == "uploads.pt.tmp":
            Path(path).write_bytes(b"\0" * 4096)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, path)

    monkeypatch.setattr(checkpoint_io.torch, "save", full_disk)
    preset = tmp_path / "disk.toml"
    preset.write_text(tomli_w.dumps({**tiny_run_config, "method": "fedavg1", "run-name": "disk"}))
    # Execute / Assert: one error line naming the folder and the space, no traceback, no .tmp
    assert main(["run", "--preset", str(preset)]) == 1
    err = capsys.readouterr().err
    folder = Path(tiny_run_config["output-dir"]) / "disk" / "checkpoints"
    (line,) = [x for x in err.splitlines() if "cannot write uploads.pt" in x]
    assert f"cannot write uploads.pt in {folder}" in line and "MiB are free there" in line
    assert "Traceback" not in err and not (folder / "uploads.pt.tmp").exists()
    # Execute: space again; the same command with resume=true finishes in the same folder
    monkeypatch.setattr(checkpoint_io.torch, "save", real_save)
    assert main(["run", "--preset", str(preset), "--run-config", "resume=true"]) == 0
    assert (folder.parent / "summary.json").is_file()


NO_GPU = not __import__("torch").cuda.is_available()
BENCH_DEVICES = [("banana", "device 'banana' is not cpu, cuda or cuda:<index>"),
                 ("cuda:x", "device 'cuda:x' is not cpu, cuda or cuda:<index>"),
                 ("cuda:7" if NO_GPU else f"cuda:{__import__('torch').cuda.device_count()}",
                  "CUDA device")]
if NO_GPU:
    BENCH_DEVICES.append(("cuda", "device='cuda' but torch sees no CUDA device"))


@pytest.mark.parametrize("device,fragment", BENCH_DEVICES, ids=[d for d, _ in BENCH_DEVICES])
def test_bench_on_a_device_that_is_not_there_is_one_line(device, fragment, capsys) -> None:
    # as `run`, `simulate` and `privacy-audit`: one line, exit 2, nothing benchmarked
    code, err = one_line_error(capsys, ["bench", "--device", device, *TINY_BENCH])
    assert code == 2 and err.startswith("configuration error: bench:") and fragment in err, err


def test_bench_refuses_a_width_the_run_config_refuses(capsys) -> None:
    code, err = one_line_error(capsys, ["bench", "--width", "3", *TINY_BENCH])
    assert code == 2, err
    assert "width must be in [4, 128] (the run config's model-width), got 3" in err


# a benchmark that takes a second, should a bad argument get through
TINY_BENCH = ["--model", "tiny", "--no-check", "--clients", "2", "--clusters", "1", "--batch",
              "2", "--steps", "1", "--image-size", "8", "--num-classes", "2"]


@pytest.mark.parametrize("device", ["banana", "cuda:x"])
def test_privacy_audit_on_a_device_that_is_not_a_device_is_one_line(device, tmp_path,
                                                                    capsys) -> None:
    code, err = one_line_error(capsys, ["privacy-audit", str(tmp_path), "--client-cache",
                                        str(tmp_path), "--device", device])
    assert code == 2 and f"device {device!r} is not cpu, cuda or cuda:<index>" in err, err


def test_the_old_engine_name_is_refused_with_the_new_one(tmp_path, capsys, no_training) -> None:
    run = {**BASE, "data-path": str(make_archive(tmp_path / "site.npz", n_train=20)),
           "output-dir": str(tmp_path / "runs")}
    preset = tmp_path / "preset.toml"
    preset.write_text(tomli_w.dumps(run))
    code, err = one_line_error(capsys, ["run", "--engine", "grid", "--preset", str(preset)])
    assert code == 2 and "--engine grid is now --engine apps" in err, err
    assert no_training == []
