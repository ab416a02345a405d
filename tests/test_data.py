"""Dataset loading: official archives through medmnist, digits, custom archives, errors."""

from __future__ import annotations

from pathlib import Path

import medmnist
import numpy as np
import pytest

from fedbicross_flwr.data.datasets import (
    REBUILT,
    DataError,
    embedded_dir,
    load_dataset,
    load_digits_dataset,
    load_medmnist,
    load_npz_archive,
    md5sum,
)
from tests.conftest import make_archive


def test_embedded_retinamnist_is_the_official_file() -> None:
    path = embedded_dir() / "retinamnist.npz"
    assert md5sum(path) == medmnist.INFO["retinamnist"]["MD5"]
    ds = load_dataset("retinamnist")
    assert (ds.in_channels, ds.num_classes) == (3, 5)
    assert (len(ds.train), len(ds.val), len(ds.test)) == (1080, 120, 400)
    assert ds.train.images.shape[1:] == (28, 28, 3) and ds.train.images.dtype == np.uint8
    assert abs(ds.majority_rate("test") - 0.435) < 1e-9  # known: class 0 is 174/400


def test_one_channel_official_archive_through_medmnist(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: a small archive named like BreastMNIST, registered with its md5
    path = make_archive(tmp_path / "breastmnist.npz", in_channels=1, num_classes=2)
    monkeypatch.setitem(medmnist.INFO["breastmnist"], "MD5", md5sum(path))
    # Execute
    ds = load_medmnist("breastmnist", tmp_path)
    # Assert
    assert (ds.in_channels, ds.num_classes) == (1, 2)
    assert ds.train.images.shape == (60, 28, 28)
    assert set(np.unique(ds.train.labels)) == {0, 1}


def test_missing_archive_names_file_md5_and_source(tmp_path: Path) -> None:
    with pytest.raises(DataError) as err:
        load_medmnist("bloodmnist", tmp_path)
    msg = str(err.value)
    assert str(tmp_path / "bloodmnist.npz") in msg
    assert medmnist.INFO["bloodmnist"]["MD5"] in msg
    assert "zenodo" in msg and "allow-download" in msg


def test_corrupt_archive_is_detected_by_md5(tmp_path: Path) -> None:
    (tmp_path / "dermamnist.npz").write_bytes(b"not a zip file")
    with pytest.raises(DataError, match="corrupt or not the official file"):
        load_medmnist("dermamnist", tmp_path)


def test_unsupported_flags_are_refused(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not a 2D single-label"):
        load_medmnist("chestmnist", tmp_path)
    with pytest.raises(DataError, match="unknown dataset"):
        load_medmnist("notamnist", tmp_path)


def test_digits_is_a_28x28_medmnist_style_dataset() -> None:
    ds = load_digits_dataset()
    assert (ds.in_channels, ds.num_classes) == (1, 10)
    assert len(ds.train) + len(ds.val) + len(ds.test) == 1797
    assert ds.test.images.shape[1:] == (28, 28) and ds.test.images.max() > 200
    assert 0.09 < ds.majority_rate("test") < 0.12  # ten near-balanced classes


def test_custom_archive_checked_against_config(tmp_path: Path) -> None:
    path = make_archive(tmp_path / "site.npz", in_channels=3, num_classes=4)
    ds = load_npz_archive(path, in_channels=3, num_classes=4)
    assert ds.train.images.shape[1:] == (28, 28, 3)
    with pytest.raises(DataError, match="expected \\(28, 28\\) for in-channels=1"):
        load_npz_archive(path, in_channels=1, num_classes=4)
    with pytest.raises(DataError, match="labels out of range \\[0, 3\\)"):
        load_npz_archive(path, in_channels=3, num_classes=3)
    with pytest.raises(DataError, match="not found"):
        load_npz_archive(tmp_path / "nope.npz", 3, 4)
    (tmp_path / "bad.npz").write_bytes(b"garbage")
    with pytest.raises(DataError, match="cannot read"):
        load_npz_archive(tmp_path / "bad.npz", 3, 4)


def test_config_shape_mismatch_is_an_error() -> None:
    with pytest.raises(DataError, match="num-classes=3 in the run config"):
        load_dataset("retinamnist", num_classes=3)


SHARED_BLOOD = Path(__file__).resolve().parents[2] / "shared" / "data" / "bloodmnist-pbc"


def test_bloodmnist_pbc_missing_or_other_file_names_file_and_md5(tmp_path: Path) -> None:
    # Missing: one line with the file and the expected md5
    with pytest.raises(DataError) as err:
        load_dataset("bloodmnist-pbc", data_dir=str(tmp_path))
    msg = str(err.value)
    assert str(tmp_path / "bloodmnist-pbc.npz") in msg and "not found" in msg
    assert REBUILT["bloodmnist-pbc"].md5 in msg and "\n" not in msg
    # Another archive under that name (valid npz, wrong md5): refused before it is read
    make_archive(tmp_path / "bloodmnist-pbc.npz", in_channels=3, num_classes=8)
    with pytest.raises(DataError, match=r"md5 [0-9a-f]{32}, expected 19de3cff"):
        load_dataset("bloodmnist-pbc", data_dir=str(tmp_path))
    # A folder in its place
    (tmp_path / "sub" / "bloodmnist-pbc.npz").mkdir(parents=True)
    with pytest.raises(DataError, match="is a folder"):
        load_dataset("bloodmnist-pbc", data_dir=str(tmp_path / "sub"))


def test_bloodmnist_pbc_matches_its_readme() -> None:
    if not (SHARED_BLOOD / "bloodmnist-pbc.npz").is_file():
        pytest.skip("bloodmnist-pbc.npz is not on this machine (../shared/data/bloodmnist-pbc)")
    ds = load_dataset("bloodmnist-pbc", data_dir=str(SHARED_BLOOD))
    assert ds.name == "bloodmnist-pbc" and (ds.in_channels, ds.num_classes) == (3, 8)
    assert (len(ds.train), len(ds.val), len(ds.test)) == (11959, 1712, 3421)
    assert np.bincount(ds.train.labels).tolist() == [852, 2181, 1085, 2026, 849, 993, 2330, 1643]
    assert np.bincount(ds.test.labels).tolist() == [244, 624, 311, 579, 243, 284, 666, 470]
    assert ds.train.images.shape[1:] == (28, 28, 3) and ds.train.images.dtype == np.uint8
    assert ds.majority_rate("test") == pytest.approx(666 / 3421)


def test_custom_without_data_path_says_that_it_is_not_set() -> None:
    # not "data archive . is a folder": the empty path is not read as the current folder
    with pytest.raises(DataError, match=r"dataset='custom' but data-path is not set"):
        load_dataset("custom", data_path="", in_channels=1, num_classes=3)
