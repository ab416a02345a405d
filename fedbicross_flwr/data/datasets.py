"""Datasets: official MedMNIST archives, scikit-learn digits, and custom npz archives.

Every dataset is returned as :class:`DatasetArrays`: uint8 images (N, 28, 28[, 3]) and int64
labels (N,) for the official train / val / test splits, plus its channel and class counts.

* MedMNIST 2D flags (``bloodmnist``, ``dermamnist``, ...): ``<flag>.npz`` read from a local
  folder through the ``medmnist`` package. The file's md5 is checked against
  ``medmnist.INFO[flag]["MD5"]`` first, so a missing or corrupt archive fails with a message
  naming the file, the expected md5 and where to get it. Downloading happens only when
  ``allow-download`` is true.
* ``bloodmnist-pbc``: BloodMNIST rebuilt from its source images (the PBC dataset, CC BY 4.0;
  same classes and official split sizes per class, pixels within about 6/255 of the official
  file): ``bloodmnist-pbc.npz`` read from the same folder, checked against its own md5
  (:data:`REBUILT`). A user with internet access uses the official ``bloodmnist`` instead.
* ``digits``: scikit-learn's 1,797 bundled handwritten digits (8x8, 10 classes), upscaled to
  28x28 and split 60/10/30 (stratified, fixed seed) on the fly. No download.
* ``custom``: any npz with the MedMNIST keys (a hospital's own data); channels and classes come
  from the config and are checked against the archive.
"""

from __future__ import annotations

import json
import os
import zipfile
from dataclasses import dataclass
from functools import lru_cache
from importlib import metadata as importlib_metadata
from pathlib import Path

import numpy as np

from fedbicross_flwr.storage.digests import file_digest
from fedbicross_flwr.storage.paths import not_a_file

EMBEDDED_DIR = Path(__file__).resolve().parents[1] / "assets"  # fedbicross_flwr/assets
SPLITS = ("train", "val", "test")
DIGITS_SPLIT_SEED = 2024  # fixed: the digits "official" split is the same for every run


class DataError(RuntimeError):
    """A dataset archive is missing, corrupt or inconsistent with the configuration."""


@dataclass(frozen=True)
class ArraySplit:
    """One split of a dataset."""

    images: np.ndarray  # uint8 (N, 28, 28) or (N, 28, 28, 3)
    labels: np.ndarray  # int64 (N,)

    def __len__(self) -> int:
        return int(self.labels.shape[0])


@dataclass(frozen=True)
class DatasetArrays:
    """A whole dataset: the official train / val / test splits and its shape."""

    name: str
    in_channels: int
    num_classes: int
    train: ArraySplit
    val: ArraySplit
    test: ArraySplit

    def majority_rate(self, split: str = "test") -> float:
        """Accuracy of always predicting the most frequent TRAINING class on ``split``."""
        majority = int(np.bincount(self.train.labels, minlength=self.num_classes).argmax())
        labels = getattr(self, split).labels
        return float((labels == majority).mean()) if len(labels) else float("nan")


# ---------------------------------------------------------------------------------------------
# where archives live
# ---------------------------------------------------------------------------------------------
def project_root() -> Path | None:
    """The source checkout, if this package runs from one or is installed editable.

    ``flwr run`` imports the app from a copy in ``$FLWR_HOME/apps/...`` that carries no data
    files, so the package finds its checkout through the installed distribution's
    ``direct_url.json`` (pip writes it for ``pip install -e .``).
    """
    here = Path(__file__).resolve().parents[2]
    # The FAB copy has pyproject.toml and assets/README.md but never the npz: test the npz.
    if (here / "pyproject.toml").is_file() and (EMBEDDED_DIR / "retinamnist.npz").is_file():
        return here
    try:
        dist = importlib_metadata.distribution("fedbicross-flwr")
        raw = dist.read_text("direct_url.json")
    except importlib_metadata.PackageNotFoundError:
        return None
    if not raw:
        return None
    url = json.loads(raw).get("url", "")
    if url.startswith("file://"):
        root = Path(url[len("file://"):])
        if (root / "fedbicross_flwr" / "assets" / "retinamnist.npz").is_file():
            return root
    return None


def embedded_dir() -> Path:
    """Folder of the archive shipped with the project (RetinaMNIST, CC BY 4.0)."""
    if (EMBEDDED_DIR / "retinamnist.npz").is_file():
        return EMBEDDED_DIR
    root = project_root()
    if root is not None and (root / "fedbicross_flwr" / "assets" / "retinamnist.npz").is_file():
        return root / "fedbicross_flwr" / "assets"
    # A regular (non-editable) install ships the archive as package data in site-packages.
    try:
        dist = importlib_metadata.distribution("fedbicross-flwr")
        candidate = Path(str(dist.locate_file("fedbicross_flwr/assets/retinamnist.npz")))
        if candidate.is_file():
            return candidate.parent
    except importlib_metadata.PackageNotFoundError:
        pass
    return EMBEDDED_DIR


def resolve_data_dir(data_dir: str) -> Path:
    """``data-dir`` if set, else ``$FEDBICROSS_DATA_DIR``, else the embedded archive folder."""
    for value, what in ((data_dir, "data-dir"),
                        (os.environ.get("FEDBICROSS_DATA_DIR", ""), "$FEDBICROSS_DATA_DIR")):
        if value:
            try:
                return Path(value).expanduser().resolve()
            except (OSError, RuntimeError) as err:  # RuntimeError: a symlink loop (3.10-3.12)
                raise DataError(f"{what} {value!r} cannot be resolved: {err}") from err
    return embedded_dir()


def md5sum(path: Path) -> str:
    """Hex md5 of a file (MedMNIST records md5s)."""
    return file_digest(path, "md5")


# ---------------------------------------------------------------------------------------------
# MedMNIST
# ---------------------------------------------------------------------------------------------
def medmnist_flags() -> list[str]:
    """The 2D single-label MedMNIST flags this project accepts."""
    import medmnist

    return [
        flag for flag, info in medmnist.INFO.items()
        if not info["python_class"].endswith("3D") and "multi-label" not in info["task"]
    ]


def load_medmnist(flag: str, root: Path, allow_download: bool = False) -> DatasetArrays:
    """Load an official 28x28 MedMNIST archive ``root/<flag>.npz`` through ``medmnist``.

    Raises
    ------
    DataError
        Unknown flag, missing archive (with download off), or md5 mismatch.
    """
    import medmnist

    if flag not in medmnist.INFO:
        raise DataError(f"unknown dataset {flag!r}; MedMNIST 2D flags: {medmnist_flags()}, "
                        f"or {', '.join(map(repr, REBUILT))}, or 'digits', or 'custom' with "
                        "data-path")
    info = medmnist.INFO[flag]
    if flag not in medmnist_flags():
        raise DataError(f"dataset {flag!r} ({info['task']}, {info['python_class']}) is not a "
                        "2D single-label classification task; this project supports "
                        f"{medmnist_flags()}")
    path = root / f"{flag}.npz"
    how = (f"download it from {info['url']} into {root}, or into a folder of your choice "
           "named by the run-config key data-dir or by $FEDBICROSS_DATA_DIR (or set "
           "allow-download=true)")
    if not path.is_file():
        if not allow_download:
            raise DataError(f"MedMNIST archive not found: {path} (expected md5 "
                            f"{info['MD5']}); {how}")
        root.mkdir(parents=True, exist_ok=True)
    else:
        got = md5sum(path)
        if got != info["MD5"]:
            raise DataError(f"MedMNIST archive {path} is corrupt or not the official file: md5 "
                            f"{got}, expected {info['MD5']}; {how}")
    cls = getattr(medmnist, info["python_class"])
    splits = {}
    for split in SPLITS:
        try:
            ds = cls(split=split, root=str(root), download=allow_download, size=28)
        except Exception as err:  # medmnist raises RuntimeError / BadZipFile / KeyError
            raise DataError(f"cannot read MedMNIST archive {path}: {err}; {how}") from err
        splits[split] = ArraySplit(np.asarray(ds.imgs, dtype=np.uint8),
                                   np.asarray(ds.labels).reshape(-1).astype(np.int64))
    if allow_download and md5sum(path) != info["MD5"]:
        raise DataError(f"downloaded archive {path} has a wrong md5 (expected {info['MD5']})")
    dataset = DatasetArrays(flag, int(info["n_channels"]), len(info["label"]), **splits)
    _check_consistency(dataset, str(path))
    return dataset


# ---------------------------------------------------------------------------------------------
# MedMNIST datasets rebuilt from their source images
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RebuiltArchive:
    """A MedMNIST-format archive rebuilt from a dataset's source images (not the official file).

    It is read from ``data-dir`` like an official flag, but checked against its own md5.
    """

    file: str
    md5: str
    in_channels: int
    num_classes: int
    source: str


#: Dataset key -> rebuilt archive. ``bloodmnist-pbc``: BloodMNIST (the FedBiCross paper's first
#: dataset) rebuilt from the PBC peripheral blood cell images (Acevedo et al., Data in Brief 30,
#: 2020, CC BY 4.0), 8 classes, RGB, the official split sizes per class.
REBUILT = {
    "bloodmnist-pbc": RebuiltArchive(
        "bloodmnist-pbc.npz", "19de3cff704d9c3101e74e3854825bc2", 3, 8,
        "BloodMNIST rebuilt from the PBC source images (official split sizes per class, pixels "
        "within about 6/255 of the official file; the official bloodmnist is the medmnist flag "
        "'bloodmnist')"),
}


def load_rebuilt(name: str, root: Path) -> DatasetArrays:
    """Load a rebuilt archive ``root/<file>`` (:data:`REBUILT`), checked against its md5.

    Raises
    ------
    DataError
        A missing file or one whose md5 differs, named with the expected md5.
    """
    info = REBUILT[name]
    path = root / info.file
    how = ("put it into a folder named by the run-config key data-dir or by "
           "$FEDBICROSS_DATA_DIR; with internet access the official archive is "
           "dataset='bloodmnist' with allow-download=true")
    if (problem := not_a_file(path, "an npz file")) is not None:
        what = "not found" if problem == "not found" else problem
        raise DataError(f"{name} archive {path} {what} (expected md5 {info.md5}); {how}")
    got = md5sum(path)
    if got != info.md5:
        raise DataError(f"{name} archive {path} is corrupt or another file: md5 {got}, "
                        f"expected {info.md5}; {how}")
    return load_npz_archive(path, info.in_channels, info.num_classes, name=name)


# ---------------------------------------------------------------------------------------------
# scikit-learn digits
# ---------------------------------------------------------------------------------------------
@lru_cache(maxsize=1)
def load_digits_dataset() -> DatasetArrays:
    """scikit-learn's 1,797 digits as a 28x28, 10-class, 1-channel MedMNIST-format dataset.

    The 8x8 images (values 0..16) are upscaled bilinearly to 28x28 and scaled to 0..255; the
    split is stratified 60 % train / 10 % val / 30 % test with a fixed seed, so every run and
    every method sees the same "official" test split.
    """
    import torch
    import torch.nn.functional as F
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    small = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1)  # (1797, 1, 8, 8)
    big = F.interpolate(small, size=(28, 28), mode="bilinear", align_corners=False)
    images = (big.squeeze(1).clamp(0, 16) * (255.0 / 16.0)).round().to(torch.uint8).numpy()
    labels = bunch.target.astype(np.int64)
    idx = np.arange(len(labels))
    train_val, test = train_test_split(idx, test_size=0.3, stratify=labels,
                                       random_state=DIGITS_SPLIT_SEED)
    train, val = train_test_split(train_val, test_size=1 / 7, stratify=labels[train_val],
                                  random_state=DIGITS_SPLIT_SEED)
    pick = lambda ix: ArraySplit(images[np.sort(ix)], labels[np.sort(ix)])  # noqa: E731
    return DatasetArrays("digits", 1, 10, pick(train), pick(val), pick(test))


def write_npz(dataset: DatasetArrays, path: Path) -> Path:
    """Write a dataset as a MedMNIST-format archive (labels as uint8 (N, 1))."""
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for split in SPLITS:
        s: ArraySplit = getattr(dataset, split)
        arrays[f"{split}_images"] = s.images
        arrays[f"{split}_labels"] = s.labels.reshape(-1, 1).astype(np.uint8)
    np.savez_compressed(path, **arrays)  # type: ignore[arg-type]
    return path


# ---------------------------------------------------------------------------------------------
# custom archives (a site's own data)
# ---------------------------------------------------------------------------------------------
def load_npz_archive(path: Path, in_channels: int, num_classes: int,
                     name: str = "custom", require_splits: tuple[str, ...] = SPLITS
                     ) -> DatasetArrays:
    """Load an npz in MedMNIST format that is not an official file.

    Splits missing from the archive (other than ``require_splits``) come back empty.

    Raises
    ------
    DataError
        Missing/unreadable file, missing keys, wrong image size or channels, labels out of
        ``[0, num_classes)``.
    """
    if in_channels not in (1, 3) or num_classes < 2:
        raise DataError(f"a custom archive needs in-channels in {{1, 3}} and num-classes >= 2 "
                        f"in the run config (got {in_channels}, {num_classes})")
    if (problem := not_a_file(path, "an npz file")) is not None:
        raise DataError(f"data archive not found: {path}" if problem == "not found"
                        else f"data archive {path} {problem}")
    if not zipfile.is_zipfile(path):  # np.load would try it as .npy or pickle instead
        raise DataError(f"cannot read data archive {path}: not an npz (zip) file "
                        f"({path.stat().st_size} bytes: empty, truncated or another format)")
    check_declared_sizes(path)
    try:
        with np.load(path, allow_pickle=False) as npz:
            content = {k: npz[k] for k in npz.files}
    except Exception as err:
        raise DataError(f"cannot read data archive {path}: {err}") from err
    splits = {}
    for split in SPLITS:
        ik, lk = f"{split}_images", f"{split}_labels"
        if ik not in content or lk not in content:
            if split in require_splits:
                raise DataError(f"data archive {path} lacks {ik!r}/{lk!r} "
                                f"(has {sorted(content)})")
            shape = (0, 28, 28) if in_channels == 1 else (0, 28, 28, 3)
            splits[split] = ArraySplit(np.zeros(shape, np.uint8), np.zeros(0, np.int64))
            continue
        splits[split] = ArraySplit(np.asarray(content[ik]),
                                   integer_labels(content[lk], f"{path}: {lk}"))
    dataset = DatasetArrays(name, in_channels, num_classes, **splits)
    _check_consistency(dataset, str(path))
    return dataset


def memory_bytes() -> int:
    """Physical memory of this machine in bytes (0 when it cannot be read)."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 0


def check_declared_sizes(path: Path, limit: int | None = None) -> int:
    """Read every array's shape and dtype from the npz headers, before loading any of them.

    An npz member declares its size in its header, and a compressed member can declare far
    more than the file holds. Loading such an archive would take minutes and the memory it
    declares before it could be refused, so the sizes are added up first.

    Parameters
    ----------
    path : Path
        An npz (zip) archive.
    limit : int, optional
        Most bytes the arrays may declare together; default half the physical memory.

    Returns
    -------
    int
        The declared bytes of all arrays.

    Raises
    ------
    DataError
        A member that is not a ``.npy`` array, a header that cannot be read, or declared sizes
        above ``limit``.
    """
    limit = limit if limit is not None else (memory_bytes() // 2 or 2**62)
    total, sizes = 0, {}
    try:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                with archive.open(info) as fh:
                    version = np.lib.format.read_magic(fh)
                    read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                            else np.lib.format.read_array_header_2_0)
                    shape, _, dtype = read(fh, max_header_size=10_000)
                nbytes = int(np.prod(shape, dtype=np.float64)) * dtype.itemsize
                sizes[info.filename.removesuffix(".npy")] = (tuple(shape), nbytes)
                total += nbytes
    except (ValueError, zipfile.BadZipFile, OSError) as err:
        raise DataError(f"cannot read data archive {path}: {err}") from err
    if total > limit:
        largest = max(sizes, key=lambda k: sizes[k][1])
        raise DataError(f"data archive {path} declares {total / 2**30:.1f} GiB of arrays "
                        f"({largest}: shape {sizes[largest][0]}), more than the "
                        f"{limit / 2**30:.1f} GiB this machine can load (half its memory); "
                        "refused before loading")
    return total


def integer_labels(labels: np.ndarray, what: str) -> np.ndarray:
    """Class labels of shape (N,) or (N, 1) as int64 (N,), refusing anything that is not a
    whole number (fractional, NaN or infinite values, booleans, strings).

    Raises
    ------
    DataError
        Labels of another shape or dtype, or values that are not whole numbers.
    """
    labels = np.asarray(labels)
    if labels.ndim not in (1, 2) or (labels.ndim == 2 and labels.shape[1] != 1):
        raise DataError(f"{what} must have shape (N,) or (N, 1), got {labels.shape}")
    labels = labels.reshape(-1)
    if labels.dtype.kind in "iu":
        return labels.astype(np.int64)
    if labels.dtype.kind != "f":
        raise DataError(f"{what} must be integer class indices, got dtype {labels.dtype}")
    if not np.isfinite(labels).all():
        raise DataError(f"{what} contains {int((~np.isfinite(labels)).sum())} NaN or infinite "
                        "value(s); labels must be integer class indices")
    fractional = labels[labels != np.round(labels)]
    if fractional.size:
        raise DataError(f"{what} contains {fractional.size} non-integer value(s) (e.g. "
                        f"{fractional[0]:g}); labels must be integer class indices")
    return labels.astype(np.int64)


def _check_consistency(ds: DatasetArrays, source: str) -> None:
    want = (28, 28) if ds.in_channels == 1 else (28, 28, 3)
    for split in SPLITS:
        s: ArraySplit = getattr(ds, split)
        if s.images.dtype != np.uint8:
            raise DataError(f"{source}: {split}_images must be uint8, got {s.images.dtype}")
        if tuple(s.images.shape[1:]) != want:
            raise DataError(f"{source}: {split}_images have shape {tuple(s.images.shape[1:])} "
                            f"per image, expected {want} for in-channels={ds.in_channels}")
        if s.images.shape[0] != s.labels.shape[0]:
            raise DataError(f"{source}: {split} has {s.images.shape[0]} images but "
                            f"{s.labels.shape[0]} labels")
        if len(s) and (s.labels.min() < 0 or s.labels.max() >= ds.num_classes):
            raise DataError(f"{source}: {split}_labels out of range [0, {ds.num_classes}) "
                            f"(min {s.labels.min()}, max {s.labels.max()})")


# ---------------------------------------------------------------------------------------------
# one entry point
# ---------------------------------------------------------------------------------------------
def load_dataset(dataset: str, data_dir: str = "", data_path: str = "",
                 allow_download: bool = False, in_channels: int = 0,
                 num_classes: int = 0) -> DatasetArrays:
    """Load the dataset a run config names (see the module docstring)."""
    if dataset == "digits":
        ds = load_digits_dataset()
    elif dataset == "custom":
        if not data_path.strip():
            raise DataError("dataset='custom' but data-path is not set: give the npz archive "
                            "to read (in a deployment, each site sets data-path in its node "
                            "config)")
        ds = load_npz_archive(Path(data_path).expanduser(), in_channels, num_classes)
    elif dataset in REBUILT:
        ds = _load_rebuilt_cached(dataset, str(resolve_data_dir(data_dir)))
    else:
        ds = _load_medmnist_cached(dataset, str(resolve_data_dir(data_dir)), allow_download)
    for what, want, got in (("in-channels", in_channels, ds.in_channels),
                            ("num-classes", num_classes, ds.num_classes)):
        if want and want != got:
            raise DataError(f"{what}={want} in the run config, but dataset {ds.name!r} has {got}")
    return ds


@lru_cache(maxsize=2)
def _load_rebuilt_cached(name: str, root: str) -> DatasetArrays:
    return load_rebuilt(name, Path(root))


@lru_cache(maxsize=4)
def _load_medmnist_cached(flag: str, root: str, allow_download: bool) -> DatasetArrays:
    return load_medmnist(flag, Path(root), allow_download)
