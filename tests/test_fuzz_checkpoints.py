"""Fuzzing the checkpoint readers: any manifest, any payload, never a traceback.

Every file a resumed run reads back (the server stage's ``manifest.json`` and its stage
checkpoints, ``checkpoints/uploads.pt``, a client-cache entry) is written here with a matching
checksum, as anyone who can write the folder can, and read back through the project's reader.
The properties: nothing escapes but the project's own error types; a refused stage checkpoint
is set aside and dropped from the manifest; and whatever is accepted is usable by the code
that consumes it (the assertions below state what "usable" means, independently of the
checks). Tampered payloads are the real checkpoints of a tiny run, one place changed: a value
replaced by anything (tensors and arrays of random shapes and dtypes, NaN/Inf, ints, strings,
lists, dicts), a key removed or added, one element poked, a tensor scaled.
"""

from __future__ import annotations

import copy
import json
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedbicross_flwr.fedbicross.checkpoint import CheckpointMismatch, StageCheckpoints
from fedbicross_flwr.fedbicross.checkpoint_checks import (
    StageLayout,
    check_bilevel,
    check_cluster,
    check_clustering,
)
from fedbicross_flwr.fedbicross.clustering import cluster_centroids
from fedbicross_flwr.fedbicross.config import FedBiCrossSettings
from fedbicross_flwr.fedbicross.method import run_fedbicross
from fedbicross_flwr.model import build_resnet18, forward_problem, probe_for
from fedbicross_flwr.protocol import ClientFailure, validate_upload
from fedbicross_flwr.storage.checkpoint_io import CheckpointRefused, load_plain, sha256_file
from fedbicross_flwr.storage.payload_checks import PayloadError
from fedbicross_flwr.storage.uploads_checkpoint import load_uploads
from tests.tiny_models import make_tiny

N, K, C, SIDE = 4, 2, 3, 6
TINY = dict(noise_samples=8, synth_steps=3, synth_batch=8, synth_lr=0.1, bn_weight=0.1,
            num_examples=4, kmeans_n_init=2, num_clusters=K, server_epochs=1)
FINGERPRINT = "ab" * 32
FAST = settings(max_examples=30, suppress_health_check=[HealthCheck.too_slow])
FEWER = settings(max_examples=20, suppress_health_check=[HealthCheck.too_slow])  # ResNet probes


# --- the real checkpoints of a tiny run -----------------------------------------------------

@pytest.fixture(scope="module")
def real(tmp_path_factory) -> dict[str, Any]:
    """The payloads a tiny run saved (clustering, both clusters' synthesis, the bi-level
    state), and what the checks of that run need.
    """
    folder = tmp_path_factory.mktemp("ckpt")
    clients = [make_tiny(seed) for seed in range(N)]
    drop = StageCheckpoints.drop
    StageCheckpoints.drop = lambda self, names: None  # keep the synthesis checkpoints too
    try:
        run_fedbicross(clients, 1, C, FedBiCrossSettings(**TINY), "cpu", progress=False,
                       image_size=SIDE, student_factory=lambda: make_tiny(99).train(),
                       checkpoint_dir=folder)
    finally:
        StageCheckpoints.drop = drop
    files = json.loads((folder / "manifest.json").read_text())["files"]
    payloads = {name: load_plain(folder / f"{name}.pt", sha) for name, sha in files.items()}
    assignment = payloads["clustering"]["assignment"]
    members = [[clients[i] for i in np.flatnonzero(assignment == k)] for k in range(K)]
    layout = StageLayout(FedBiCrossSettings(**TINY), N, C, 1, SIDE, torch.float32)
    student = make_tiny(99).train()
    checks = {
        "clustering": lambda p: check_clustering(p, layout),
        "epoch0-cluster0": lambda p: check_cluster(p, layout, members[0]),
        "epoch0-cluster1": lambda p: check_cluster(p, layout, members[1]),
        "epoch0-bilevel": lambda p: check_bilevel(p, layout, 0, members, student),
    }
    assert sorted(payloads) == sorted(checks)
    for name, check in checks.items():
        check(payloads[name])  # the run's own checkpoints pass
    return {"payloads": payloads, "checks": checks}


# --- what a tampered payload can be ---------------------------------------------------------

NUMBERS = st.one_of(st.integers(-3, 5), st.floats(allow_nan=True, allow_infinity=True),
                    st.sampled_from([1e3, -1e30, 2**62]))
DTYPES = st.sampled_from([torch.float32, torch.float64, torch.float16, torch.bfloat16,
                          torch.int64, torch.int32, torch.uint8, torch.bool])


@st.composite
def tensors(draw) -> torch.Tensor:
    shape = draw(st.lists(st.integers(0, 4), max_size=4))
    fill = draw(NUMBERS)
    base = torch.arange(int(np.prod(shape)), dtype=torch.float64).reshape(shape)
    with np.errstate(all="ignore"):
        value = (base * float(fill) if draw(st.booleans()) else torch.full(shape, float(fill),
                                                                           dtype=torch.float64))
    value = value.to(draw(DTYPES))
    if value.is_floating_point() and draw(st.booleans()):
        value.requires_grad_(True)
    return value


def _as_array(t: torch.Tensor) -> np.ndarray:
    t = t.detach()
    return (t.float() if t.dtype == torch.bfloat16 else t).numpy()


LEAVES = st.one_of(st.none(), st.booleans(), NUMBERS, st.text(max_size=4), tensors(),
                   tensors().map(_as_array))
VALUES = st.recursive(LEAVES, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=4), inner, max_size=3)),
    max_leaves=6)


def _places(value: Any, path: tuple = ()) -> list[tuple]:
    """Every place in a payload: the paths of its dicts', lists' and tuples' items."""
    places = [path]
    if isinstance(value, dict):
        for key, item in value.items():
            places += _places(item, path + (key,))
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            places += _places(item, path + (i,))
    return places


_DELETE = object()  # what a deleting change returns


def _swap(root: Any, path: tuple, change) -> Any:
    """``root`` with the value at ``path`` replaced by ``change(value)`` (a deleting change
    returns the ``_DELETE`` marker).
    """
    if not path:
        return change(root)
    head, rest = path[0], path[1:]
    new = _swap(root[head], rest, change)
    if isinstance(root, dict):
        out = dict(root)
        if new is _DELETE:
            del out[head]
        else:
            out[head] = new
        return out
    items = list(root)
    if new is _DELETE:
        del items[head]
    else:
        items[head] = new
    return type(root)(items)



def _poke(value: Any, index: int, number: float) -> Any:
    """Element ``index`` (flat, modulo the size) of a tensor or array set to ``number``."""
    if isinstance(value, torch.Tensor):
        value = value.detach().clone()
        with np.errstate(all="ignore"):
            value.view(-1)[index % value.numel()] = torch.tensor(float(number)).to(value.dtype)
    else:
        value = value.copy()
        with np.errstate(all="ignore"):
            value.flat[index % value.size] = np.asarray(number).astype(value.dtype)
    return value


def _scale(value: Any, factor: float) -> Any:
    """Every tensor and array in ``value`` times ``factor`` (a whole model, or one tensor)."""
    if isinstance(value, torch.Tensor):
        return value.detach() * factor if value.is_floating_point() else value * int(factor)
    if isinstance(value, np.ndarray):
        with np.errstate(all="ignore"):
            return value * np.asarray(factor).astype(value.dtype)
    if isinstance(value, dict):
        return {key: _scale(item, factor) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_scale(item, factor) for item in value)
    return value


@st.composite
def tampered(draw, payload: Any) -> Any:
    """``payload`` with one place changed: a value replaced or removed, a key added, one
    element of a tensor or an array poked, a tensor or an array scaled.
    """
    places = _places(payload)
    at = {"array": [p for p in places if isinstance(_at(payload, p), (torch.Tensor, np.ndarray))
                    and np.prod(_at(payload, p).shape) > 0],
          "dict": [p for p in places if isinstance(_at(payload, p), dict)],
          "any": places}
    how = draw(st.sampled_from(["replace", "delete", "add-key", "poke", "poke", "scale"]))
    path = draw(st.sampled_from(at["array" if how == "poke" else
                                   "dict" if how == "add-key" else "any"]))
    if how == "replace":
        new = draw(VALUES)
        return _swap(payload, path, lambda old: new)
    if how == "delete":
        return _swap(payload, path, lambda old: _DELETE) if path else {}
    if how == "add-key":
        key, extra = draw(st.text(max_size=4)), draw(VALUES)
        return _swap(payload, path, lambda old: {**old, key: extra})
    if how == "poke":
        index, number = draw(st.integers(0, 10**6)), draw(NUMBERS)
        return _swap(payload, path, lambda old: _poke(old, index, number))
    factor = draw(st.sampled_from([1e3, -1.0, 0.0, 2.0]))
    return _swap(payload, path, lambda old: _scale(old, factor))


def _at(root: Any, path: tuple) -> Any:
    for key in path:
        root = root[key]
    return root


@contextmanager
def _folder():
    with tempfile.TemporaryDirectory() as tmp:
        yield Path(tmp)


# --- what the consumers need (stated without the checks) ------------------------------------

def _usable_clustering(p: dict) -> None:
    preds, assignment = p["preds"], p["assignment"]
    assert preds.shape == (N, TINY["noise_samples"] * C) and preds.dtype == np.float64
    assert np.isfinite(preds).all() and preds.min() >= 0 and preds.max() <= 1
    assert assignment.shape == (N,) and assignment.dtype == np.int64
    assert sorted(set(assignment.tolist())) == list(range(K))
    assert cluster_centroids(preds, assignment, K).shape == (K, preds.shape[1])
    assert all(type(i) is int and 0 <= i < N for i in p["degenerate"])


def _usable_cluster(p: dict) -> None:
    t, b = TINY["synth_steps"], TINY["synth_batch"]
    assert p["trajectory"].shape == (t, b, 1, SIDE, SIDE)
    assert p["trajectory"].dtype == torch.float32 and torch.isfinite(p["trajectory"]).all()
    assert p["labels"].dtype == torch.int64 and p["labels"].shape == (b,)
    assert 0 <= int(p["labels"].min()) and int(p["labels"].max()) < C
    for key in ("teacher_probs", "noise_probs"):
        assert p[key].shape == (t, b, C) and p[key].dtype == torch.float32
        assert float(p[key].min()) >= 0 and float(p[key].max()) <= 1
    assert all(len(p["diag"][key]) == t for key in ("ce", "bn", "tv"))
    assert all(float(v) >= 0 for v in p["times"].values())


def _usable_bilevel(p: dict) -> None:
    for state in p["students"]:
        student = make_tiny(99)
        student.load_state_dict(state)  # strict: every name, shape
        assert forward_problem(student, 1, SIDE) is None
    weights = p["weights"]
    assert weights.shape == (K, K) and weights.dtype == torch.float64
    assert float(weights.min()) >= -1e-6 and torch.allclose(weights.sum(1),
                                                             torch.ones(K, dtype=torch.float64))
    history = np.concatenate([h["weights"] for h in p["histories"]])
    assert history.shape == (TINY["synth_steps"], K, K) and np.isfinite(history).all()
    assert len(p["examples"]) == len(p["example_labels"]) == K
    assert all(int(y.min()) >= 0 and int(y.max()) < C for y in p["example_labels"])


USABLE = {"clustering": _usable_clustering, "epoch0-cluster0": _usable_cluster,
          "epoch0-cluster1": _usable_cluster, "epoch0-bilevel": _usable_bilevel}


# --- the properties -------------------------------------------------------------------------

JSON = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(), st.floats(),
                              st.text(max_size=70)),
                    lambda inner: st.one_of(st.lists(inner, max_size=3),
                                            st.dictionaries(st.text(max_size=70), inner,
                                                            max_size=3)),
                    max_leaves=8)
NAMES = st.one_of(st.sampled_from(["clustering", "../x", "", "a/b", "x.pt", "epoch0-bilevel"]),
                  st.text(max_size=8))
DIGESTS = st.one_of(st.just("0" * 64), st.sampled_from(["A" * 64, "0" * 63]), JSON)


@st.composite
def manifests(draw) -> Any:
    """Any JSON value, mostly one close to a manifest: this run's fingerprint, a mapping of
    names (plain or not) to digests (sha256 hex or not), sometimes one key more.
    """
    if draw(st.sampled_from(["near", "near", "near", "any"])) == "any":
        return draw(JSON)
    fingerprint = draw(st.one_of(st.just(FINGERPRINT), st.just(FINGERPRINT), JSON))
    files = draw(st.one_of(st.dictionaries(NAMES, DIGESTS, min_size=1, max_size=3),
                           st.dictionaries(NAMES, st.just("0" * 64), min_size=1, max_size=3),
                           JSON))
    manifest = {"fingerprint": fingerprint, "files": files}
    if draw(st.sampled_from([False, False, False, True])):
        manifest[draw(st.text(max_size=3))] = draw(JSON)
    return manifest


@FAST
@given(manifest=manifests(), raw=st.one_of(st.none(), st.binary(max_size=40)))
def test_any_manifest_is_used_set_aside_or_refused_as_another_runs(manifest, raw) -> None:
    with _folder() as folder:
        path = folder / "manifest.json"
        path.write_bytes(raw if raw is not None else json.dumps(manifest).encode())
        try:
            checkpoints = StageCheckpoints(folder, FINGERPRINT)
        except CheckpointMismatch:  # a well-formed manifest of another run: left alone
            assert json.loads(path.read_text())["fingerprint"] != FINGERPRINT
            return
        for name, digest in checkpoints.files.items():  # accepted: plain names, sha256 hex
            assert name.replace("-", "").replace("_", "").isalnum() and name.isascii()
            assert len(digest) == 64 and set(digest) <= set("0123456789abcdef")
        if (folder / "manifest.json.bad").exists():
            assert checkpoints.files == {}
        else:
            assert raw is None and manifest["fingerprint"] == FINGERPRINT
        assert json.loads(path.read_text()) == {"fingerprint": FINGERPRINT,
                                                "files": checkpoints.files}


@pytest.mark.parametrize("name", sorted(USABLE))
def test_any_tampered_stage_checkpoint_is_usable_or_set_aside(real, name) -> None:
    @FAST
    @given(payload=tampered(real["payloads"][name]))
    def run(payload) -> None:
        with _folder() as folder:
            checkpoints = StageCheckpoints(folder, FINGERPRINT)
            checkpoints.save(name, payload)  # the real writer: file and sha256
            restored = checkpoints.load(name, real["checks"][name])
            if restored is None:
                assert (folder / f"{name}.pt.bad").is_file() and not checkpoints.has(name)
                assert json.loads((folder / "manifest.json").read_text())["files"] == {}
            else:
                USABLE[name](restored)

    run()


@FAST
@given(data=st.data())
def test_scaled_students_are_usable_or_set_aside(real, data) -> None:
    # the x1e3 case of a probe, generalised: any of a student's tensors times any factor
    payload = real["payloads"]["epoch0-bilevel"]
    j = data.draw(st.integers(0, K - 1))
    names = data.draw(st.lists(st.sampled_from(sorted(payload["students"][j])), min_size=1,
                               unique=True))
    factor = data.draw(st.sampled_from([1e3, 1e6, -1.0, 1e-3, 10.0]))
    students = [dict(state) for state in payload["students"]]
    students[j].update({n: _scale(students[j][n], factor) for n in names})
    with _folder() as folder:
        checkpoints = StageCheckpoints(folder, FINGERPRINT)
        checkpoints.save("epoch0-bilevel", {**payload, "students": students})
        restored = checkpoints.load("epoch0-bilevel", real["checks"]["epoch0-bilevel"])
        if restored is None:
            assert (folder / "epoch0-bilevel.pt.bad").is_file()
        else:
            _usable_bilevel(restored)


@FAST
@given(payload=st.dictionaries(st.sampled_from(["preds", "assignment", "degenerate",
                                                "trajectory", "labels", "students", "weights",
                                                "times", "x"]), VALUES, max_size=6))
def test_random_payloads_are_refused_by_every_stage_check(real, payload) -> None:
    for check in real["checks"].values():
        with pytest.raises(PayloadError):
            check(payload)


@FAST
@given(data=st.binary(max_size=200))
def test_any_bytes_with_a_matching_checksum_are_refused_as_a_checkpoint(data) -> None:
    with _folder() as folder:
        (folder / "x.pt").write_bytes(data)
        with pytest.raises(CheckpointRefused, match="x.pt"):
            load_plain(folder / "x.pt", sha256_file(folder / "x.pt"))


@pytest.fixture(scope="module")
def reference() -> dict:
    torch.manual_seed(0)
    return build_resnet18(1, C, 4).state_dict()


def test_any_tampered_upload_checkpoint_is_usable_or_refused(reference) -> None:
    real_uploads = {"format": 1, "uploads": [
        {"partition_id": pid, "num_examples": 10 + pid,
         "state": {k: v.clone() for k, v in reference.items()}} for pid in range(2)]}
    probe = probe_for(reference)

    @FEWER
    @given(payload=tampered(real_uploads))
    def run(payload) -> None:
        with _folder() as folder:
            path = folder / "uploads.pt"
            torch.save(payload, path)
            (folder / "uploads.pt.sha256").write_text(sha256_file(path))
            try:
                uploads = load_uploads(path, reference, probe, {0: 10, 1: 11})
            except CheckpointRefused as err:
                assert "uploads.pt" in str(err)
                return
            assert len({u.partition_id for u in uploads}) == len(uploads)
            for u in uploads:
                assert validate_upload(u.state, reference, probe) is None
                assert 1 <= u.num_examples <= 11

    run()


def test_any_tampered_client_cache_payload_is_usable_or_refused(reference) -> None:
    from fedbicross_flwr.config.run_config import RunConfig
    from fedbicross_flwr.storage.client_cache import check_clients

    cfg = RunConfig.from_run_config({"num-clients": 3, "model-width": 4, "num-classes": C,
                                     "in-channels": 1})
    metrics = {"num-examples": 10.0, "val-acc": 0.5}
    real_cache = {"replies": {2: {"state": dict(reference), "metrics": dict(metrics)}},
                  "failures": [{"partition_id": 1, "node": "local", "phase": "train",
                                "reason": "out of memory"}],
                  "own": {2: dict(reference)}}
    check_clients(real_cache, cfg, (1, C))
    probe = probe_for(reference)

    @FEWER
    @given(payload=tampered(real_cache))
    def run(payload) -> None:
        try:
            check_clients(copy.copy(payload), cfg, (1, C))
        except PayloadError:
            return
        for pid, reply in payload["replies"].items():  # what the direct engine does with it
            assert 0 <= pid < 3 and validate_upload(reply["state"], reference, probe) is None
            assert validate_upload(payload["own"][pid], reference, probe) is None
        for failure in payload["failures"]:
            ClientFailure(**failure)

    run()
