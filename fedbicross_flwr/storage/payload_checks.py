"""Checks of a checkpoint payload read back from disk: types, keys, shapes, dtypes, ranges.

A checkpoint's sha256 is recorded in a file of the same folder, so it proves that a file was
not damaged, not that it holds what the run expects: whoever can write the folder can write
both. Each reader therefore checks the payload against what the run would have computed
before using any of it. The checks here are the vocabulary those readers share; each raises
:class:`PayloadError` naming where in the payload the problem is (``['students'][1]``) and
what it is, in one line. Callers add the file's name.

It imports nothing from the package.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch


class PayloadError(ValueError):
    """A checkpoint payload without the layout or the values the run expects."""


def _kind(value: Any) -> str:
    return type(value).__name__


def record(value: Any, where: str, keys: Iterable[str], optional: Iterable[str] = ()) -> dict:
    """``value`` as a dict holding exactly ``keys`` (and maybe some of ``optional``)."""
    if not isinstance(value, dict):
        raise PayloadError(f"{where or 'the payload'} is a {_kind(value)}, not a dict")
    keys, optional = set(keys), set(optional)
    missing = sorted(keys - set(value))
    extra = sorted(map(repr, set(value) - keys - optional))
    if missing or extra:
        raise PayloadError(f"{where or 'the payload'} must hold the keys {sorted(keys)}: "
                           f"missing {missing}, not allowed {extra[:5]}")
    return value


def items(value: Any, where: str, length: int | None = None) -> Sequence[Any]:
    """``value`` as a list or tuple, of ``length`` items when given."""
    if not isinstance(value, (list, tuple)):
        raise PayloadError(f"{where} is a {_kind(value)}, not a list")
    if length is not None and len(value) != length:
        raise PayloadError(f"{where} has {len(value)} items, expected {length}")
    return value


def _shape_text(shape: Sequence[int | None]) -> str:
    return "(" + ", ".join("any" if n is None else str(n) for n in shape) + ")"


def _check_shape(got: tuple[int, ...], shape: Sequence[int | None], where: str) -> None:
    if len(got) != len(shape) or any(w is not None and g != w for g, w in zip(got, shape)):
        raise PayloadError(f"{where} has shape {got}, expected {_shape_text(shape)}")


def tensor(value: Any, where: str, shape: Sequence[int | None], dtype: torch.dtype) -> torch.Tensor:
    """``value`` as a tensor of ``shape`` (None: any size on that axis) and ``dtype``."""
    if not isinstance(value, torch.Tensor):
        raise PayloadError(f"{where} is a {_kind(value)}, not a tensor")
    _check_shape(tuple(value.shape), shape, where)
    if value.dtype != dtype:
        raise PayloadError(f"{where} has dtype {value.dtype}, expected {dtype}")
    return value


def array(value: Any, where: str, shape: Sequence[int | None], dtype: np.dtype | type) -> np.ndarray:
    """``value`` as a numpy array of ``shape`` and ``dtype``."""
    if not isinstance(value, np.ndarray):
        raise PayloadError(f"{where} is a {_kind(value)}, not a numpy array")
    _check_shape(tuple(value.shape), shape, where)
    if value.dtype != np.dtype(dtype):
        raise PayloadError(f"{where} has dtype {value.dtype}, expected {np.dtype(dtype)}")
    return value


def within(values: torch.Tensor | np.ndarray, where: str, low: float, high: float,
           tolerance: float = 0.0) -> None:
    """Every value in [low - tolerance, high + tolerance] (and finite)."""
    data = values.detach().cpu().double().numpy() if isinstance(values, torch.Tensor) \
        else np.asarray(values, dtype=np.float64)
    if data.size == 0:
        return
    if not np.isfinite(data).all():
        raise PayloadError(f"{where} holds NaN/Inf values")
    smallest, largest = float(data.min()), float(data.max())
    if smallest < low - tolerance or largest > high + tolerance:
        bad = smallest if smallest < low - tolerance else largest
        raise PayloadError(f"{where} holds {bad:g}, outside [{low:g}, {high:g}]")


def labels(value: Any, where: str, length: int, num_classes: int) -> torch.Tensor:
    """(length,) int64 tensor of values in [0, num_classes)."""
    found = tensor(value, where, (length,), torch.int64)
    within(found, where, 0, num_classes - 1)
    return found


def number(value: Any, where: str, low: float = -math.inf, high: float = math.inf) -> float:
    """One finite real number (an int or a float, not a bool) in [low, high]."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise PayloadError(f"{where} is a {_kind(value)}, not a number")
    if not math.isfinite(value) or not low <= value <= high:
        raise PayloadError(f"{where} is {value!r}, not a finite number in [{low:g}, {high:g}]")
    return float(value)


def whole(value: Any, where: str, low: int, high: int) -> int:
    """One int (not a bool) in [low, high]."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise PayloadError(f"{where} is a {_kind(value)}, not an int")
    if not low <= value <= high:
        raise PayloadError(f"{where} is {value}, outside [{low}, {high}]")
    return value


def seconds(value: Any, where: str) -> dict[str, float]:
    """A dict of stage name -> wall seconds (finite, >= 0)."""
    if not isinstance(value, dict):
        raise PayloadError(f"{where} is a {_kind(value)}, not a dict")
    for name, time_s in value.items():
        if not isinstance(name, str):
            raise PayloadError(f"{where} has a key {name!r} that is not a stage name")
        number(time_s, f"{where}[{name!r}]", 0.0)
    return value


def plain(value: Any, where: str) -> None:
    """JSON-like data: str, bool, None, finite numbers, lists, and dicts with str keys."""
    if value is None or isinstance(value, (str, bool)):
        return
    if isinstance(value, (int, float)):
        number(value, where)
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            plain(item, f"{where}[{i}]")
    elif isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise PayloadError(f"{where} has a key {key!r} that is not a str")
            plain(item, f"{where}[{key!r}]")
    else:
        raise PayloadError(f"{where} is a {_kind(value)}, not plain data")


def tensors_like(value: Any, where: str, reference: Mapping[str, torch.Tensor],
                 subset: bool = False) -> dict[str, torch.Tensor]:
    """A dict of name -> tensor with ``reference``'s names (``subset``: some of them), each of
    the reference tensor's shape and dtype.
    """
    if not isinstance(value, dict):
        raise PayloadError(f"{where} is a {_kind(value)}, not a dict of tensors")
    extra = sorted(map(repr, set(value) - set(reference)))
    missing = [] if subset else sorted(set(reference) - set(value))
    if extra or missing:
        raise PayloadError(f"{where} must hold {'some of ' if subset else ''}the tensors "
                           f"of the model: missing {missing[:5]}, not allowed {extra[:5]}")
    for name, found in value.items():
        want = reference[name]
        tensor(found, f"{where}[{name!r}]", tuple(want.shape), want.dtype)
    return value


__all__ = ["PayloadError", "array", "items", "labels", "number", "plain", "record", "seconds",
           "tensor", "tensors_like", "whole", "within"]
