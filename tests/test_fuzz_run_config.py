"""Fuzz: the run-config parser turns anything into a valid config or one ConfigError.

Any mapping of keys (known or not) to values of any type (None, bools, integers beyond 64
bits, NaN, inf, strings, lists, tables), any ``--run-config`` text and any preset file's
bytes: the result is a :class:`RunConfig` whose every value is possible (the key's type, a
finite number in its range, one of its choices, a seed every random generator takes) or a
:class:`ConfigError`, never another exception. Hypothesis, with the suite's fixed seed and
recorded example database (tests/conftest.py).
"""

from __future__ import annotations

import dataclasses
import math
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from fedbicross_flwr.config.run_config import (
    RunConfig,
    load_preset,
    parse_overrides,
)
from fedbicross_flwr.keys.errors import ConfigError
from fedbicross_flwr.keys.fields import is_key, key_name
from fedbicross_flwr.training import client_seed

FIELDS = {key_name(f): f for f in dataclasses.fields(RunConfig) if is_key(f)}
KEYS = sorted(FIELDS)

ANY_VALUE = st.one_of(
    st.none(), st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([0, 1, -1, 2, 3, 4, 2**31, 2**32 - 1, 2**32, 2**63, 10**6]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0.0, -0.0, 1e-300, 0.5, 1.0, 1.5, 1e6, 1e308, math.inf, -math.inf,
                     math.nan]),
    st.text(max_size=12),
    st.sampled_from(["", "auto", "cpu", "cuda", "fp32", "bf16", "fedavg1", "local,fedavg1",
                     "fedbicross", "custom", "digits", "/tmp/x", "relative", "0=1", "eta=",
                     "a\nb", ".."]),
    st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=4), st.integers(), max_size=2),
)


def _typed_values(name: str) -> st.SearchStrategy[Any]:
    """Values of a key's own type, at and beyond its bounds (so the fuzzing reaches past the
    type checks), or, sometimes, anything.
    """
    f = FIELDS[name]
    meta, kind = f.metadata, type(f.default)
    if meta["choices"]:
        own: st.SearchStrategy[Any] = st.sampled_from(list(meta["choices"]))
    elif kind is bool:
        own = st.booleans()
    elif kind in (int, float):
        edges = [x for b in (meta["low"], meta["high"]) if b is not None
                 for x in (b - 1, b, b + 1, b * 2)]
        extremes = ([2**31, 2**32, 2**63 - 1, -(2**63)] if kind is int
                    else [math.inf, -math.inf, math.nan, 1e308])
        own = st.sampled_from([kind(x) for x in edges] + [kind(0), kind(-1), *extremes]) \
            | (st.integers() if kind is int else st.floats())
    else:
        own = st.text(max_size=12)
    return st.one_of(own, own, ANY_VALUE)


MAPPINGS = st.dictionaries(
    st.one_of(st.sampled_from(KEYS), st.text(max_size=12)), ANY_VALUE, max_size=4,
) | st.lists(st.sampled_from(KEYS), min_size=1, max_size=3, unique=True).flatmap(
    lambda names: st.fixed_dictionaries({n: _typed_values(n) for n in names}))


def assert_possible(cfg: RunConfig) -> None:
    """Every value of an accepted config is one a run can use."""
    for name, f in FIELDS.items():
        value, meta = getattr(cfg, f.name), f.metadata
        assert type(value) is type(f.default), (name, value)
        if meta["choices"] is not None:
            assert value in meta["choices"], (name, value)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            assert math.isfinite(value), (name, value)
            low, high = meta["low"], meta["high"]
            if low is not None:
                assert value > low if meta["low_open"] else value >= low, (name, value)
            if high is not None:
                assert value <= high, (name, value)
    assert 0 <= cfg.min_clients <= cfg.num_clients and cfg.num_clusters <= cfg.num_clients
    assert cfg.local_epochs >= 1 and cfg.pers_epochs >= 0 and cfg.batch_size >= 1
    assert cfg.method_list  # parses, names known methods
    # the seed: numpy's legacy and new generators and torch take it, at every client
    np.random.default_rng(cfg.seed)
    np.random.RandomState(cfg.seed)
    torch.Generator().manual_seed(client_seed(cfg, cfg.num_clients - 1) + 7919 * cfg.rounds)


@settings(max_examples=400)
@given(MAPPINGS)
@example({"seed": 2**32})  # found: accepted, then numpy's legacy seed refused it mid-run
@example({"synth-lr": math.inf})  # found: a key bounded below only took inf
def test_any_mapping_is_a_possible_config_or_one_config_error(mapping: dict) -> None:
    try:
        cfg = RunConfig.from_run_config(mapping)
    except ConfigError as err:
        assert str(err).strip()
        return
    assert_possible(cfg)


@settings(max_examples=200)
@given(st.text(max_size=40) | st.lists(
    st.tuples(st.sampled_from(KEYS), st.sampled_from(
        ["1", "-1", "0.5", "inf", "nan", "-inf", "1e400", "true", "'cpu'", '"x', "'", "[1]",
         "{a=1}", "99999999999999999999"])), max_size=4).map(
    lambda pairs: " ".join(f"{k}={v}" for k, v in pairs)))
@example("bn-weight=inf")  # found: accepted
@example('local-lr="x')  # found: shlex's ValueError, not a ConfigError
def test_any_override_text_is_a_possible_config_or_one_config_error(text: str) -> None:
    try:
        cfg = RunConfig.from_run_config(parse_overrides(text))
    except ConfigError as err:
        assert str(err).strip()
        return
    assert_possible(cfg)


@settings(max_examples=100)
@given(st.binary(max_size=64) | st.text(max_size=64).map(str.encode))
def test_any_preset_file_is_a_mapping_or_one_config_error(content: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "preset.toml"
        path.write_bytes(content)
        try:
            preset = load_preset(path)
        except ConfigError as err:
            assert str(err).startswith(f"preset {path}")
            return
    assert isinstance(preset, dict)
    try:
        assert_possible(RunConfig.from_run_config(preset))
    except ConfigError:
        pass
