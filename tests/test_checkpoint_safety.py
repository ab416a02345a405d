"""Checkpoints are data, not code: ``checkpoints/uploads.pt`` and the client cache.

A tampered upload checkpoint (bytes changed; NaN or 7-class uploads with a matching checksum;
a pickle payload that runs code) is refused with a clear message, never executed, and the
resumed run restarts the server stage from scratch with the new uploads.
"""

from __future__ import annotations

import logging

import pytest
import torch

from fedbicross_flwr.model import build_resnet18, probe_for
from fedbicross_flwr.protocol import ClientUpload
from fedbicross_flwr.storage.checkpoint_io import CheckpointRefused, sha256_file
from fedbicross_flwr.storage.uploads_checkpoint import (
    checkpointed_uploads,
    load_uploads,
    save_uploads,
)


class _Payload:
    """A pickle that creates a file when unpickled (stands for arbitrary code)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture(scope="module")
def reference() -> dict:
    torch.manual_seed(0)
    return build_resnet18(1, 3).state_dict()


def _uploads(reference, scale: float = 1.0) -> list[ClientUpload]:
    return [ClientUpload(pid, {k: (v * scale if v.is_floating_point() and "running" not in k
                                   else v.clone()) for k, v in reference.items()}, 10 + pid)
            for pid in range(2)]


def _plain(uploads) -> dict:
    return {"format": 1, "uploads": [{"partition_id": u.partition_id,
                                      "num_examples": u.num_examples, "state": u.state}
                                     for u in uploads]}


def _forge(path, payload) -> None:
    """Replace the file and its recorded sha256, as an attacker with disk access would."""
    torch.save(payload, path)
    path.with_name(path.name + ".sha256").write_text(sha256_file(path))


def test_uploads_round_trip(tmp_path, reference) -> None:
    uploads = _uploads(reference)
    save_uploads(uploads, tmp_path / "uploads.pt")
    back = load_uploads(tmp_path / "uploads.pt", reference, probe_for(reference))
    assert [(u.partition_id, u.num_examples) for u in back] == [(0, 10), (1, 11)]
    assert all(torch.equal(b.state[k], u.state[k]) for b, u in zip(back, uploads)
               for k in reference)


def _nan(reference, path, marker):
    plain = _plain(_uploads(reference))
    plain["uploads"][1]["state"]["layer1.0.conv1.weight"][0, 0, 0, 0] = float("nan")
    _forge(path, plain)


def _seven_classes(reference, path, marker):
    seven = build_resnet18(1, 7).state_dict()
    plain = _plain(_uploads(reference))
    plain["uploads"][0]["state"] = seven
    _forge(path, plain)


def _pickle(reference, path, marker):
    plain = _plain(_uploads(reference))
    plain["uploads"][0]["note"] = _Payload(marker)
    _forge(path, plain)


def _flipped_byte(reference, path, marker):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


TAMPERING = {
    "nan": (_nan, "the upload of partition 1 is refused: layer1.0.conv1.weight contains NaN"),
    "7-class": (_seven_classes, "the upload of partition 0 is refused: different number of "
                                "classes: fc.weight has shape (7, 512)"),
    "pickle": (_pickle, "is not plain tensor data and was not loaded"),
    "flipped-byte": (_flipped_byte, "was altered or is corrupt (sha256"),
}


@pytest.mark.parametrize("kind", sorted(TAMPERING))
def test_a_tampered_upload_checkpoint_is_refused_and_the_stage_restarts(
        kind, tmp_path, reference, caplog) -> None:
    # Prepare: an interrupted run's checkpoints (uploads + a server-stage file), then tampered
    tamper, message = TAMPERING[kind]
    run_dir = tmp_path / "run"
    first = _uploads(reference)
    checkpointed_uploads(run_dir, first, False, reference)
    (run_dir / "checkpoints" / "clustering.pt").write_bytes(b"made from the old uploads")
    path = run_dir / "checkpoints" / "uploads.pt"
    marker = tmp_path / "pwned"
    tamper(reference, path, marker)
    fresh = _uploads(reference, scale=0.5)  # the resumed run's phase 1
    # Execute
    with pytest.raises(CheckpointRefused, match="uploads.pt"):
        load_uploads(path, reference, probe_for(reference))
    with caplog.at_level(logging.WARNING):
        used = checkpointed_uploads(run_dir, fresh, True, reference, probe_for(reference))
    # Assert: refused with its reason, nothing run; the new uploads are used and saved; the
    # stage's old checkpoints are set aside, not reused and not deleted
    assert message in caplog.text and "restarts from scratch" in caplog.text
    assert not marker.exists()
    assert used == fresh
    again = load_uploads(path, reference)
    assert all(torch.equal(a.state[k], f.state[k]) for a, f in zip(again, fresh)
               for k in reference)
    assert not (run_dir / "checkpoints" / "clustering.pt").exists()
    (aside,) = run_dir.glob("checkpoints-refused-*")
    assert (aside / "clustering.pt").read_bytes() == b"made from the old uploads"


def test_an_upload_checkpoint_without_its_checksum_is_refused(tmp_path, reference) -> None:
    save_uploads(_uploads(reference), tmp_path / "uploads.pt")
    (tmp_path / "uploads.pt.sha256").unlink()
    with pytest.raises(CheckpointRefused, match="has no recorded sha256"):
        load_uploads(tmp_path / "uploads.pt", reference)


def test_a_client_cache_entry_holding_a_pickle_is_refused(tmp_path, tiny_run_config) -> None:
    # Prepare: a valid cache entry, then its payload replaced and meta.json's sha256 updated
    import json

    from fedbicross_flwr.config.run_config import RunConfig
    from fedbicross_flwr.storage import client_cache

    cfg = RunConfig.from_run_config(tiny_run_config)
    entry = client_cache.save(tmp_path, cfg, {"replies": {}, "failures": [], "own": {}})
    assert client_cache.load(tmp_path, cfg, (cfg.in_channels, cfg.num_classes)) == {"replies": {}, "failures": [], "own": {}}
    marker = tmp_path / "pwned"
    torch.save({"replies": _Payload(marker)}, entry / "clients.pt")
    meta = json.loads((entry / "meta.json").read_text())
    (entry / "meta.json").write_text(json.dumps({**meta,
                                                 "sha256": sha256_file(entry / "clients.pt")}))
    # Execute / Assert: a cache miss (retrain), and the payload never ran
    assert client_cache.load(tmp_path, cfg, (cfg.in_channels, cfg.num_classes)) is None
    assert not marker.exists()


def _resume_with(run_dir, reference, fresh, caplog, bounds=None):
    with caplog.at_level(logging.WARNING):
        return checkpointed_uploads(run_dir, fresh, True, reference, probe_for(reference),
                                    bounds)


def _interrupted(tmp_path, reference):
    run_dir = tmp_path / "run"
    checkpointed_uploads(run_dir, _uploads(reference), False, reference)
    (run_dir / "checkpoints" / "clustering.pt").write_bytes(b"made from the old uploads")
    return run_dir, run_dir / "checkpoints" / "uploads.pt"


def test_a_checkpointed_count_is_bounded_as_a_live_reply_is(tmp_path, reference,
                                                            caplog) -> None:
    # Prepare: num-examples 1e9 for partition 1, with a recomputed sha256
    run_dir, path = _interrupted(tmp_path, reference)
    plain = _plain(_uploads(reference))
    plain["uploads"][1]["num_examples"] = 10**9
    _forge(path, plain)
    fresh = _uploads(reference, scale=0.5)
    # Execute / Assert: the partition's bound refuses it, and the stage restarts
    with pytest.raises(CheckpointRefused, match="num-examples=1000000000 exceeds the 11"):
        load_uploads(path, reference, max_examples={0: 10, 1: 11})
    assert _resume_with(run_dir, reference, fresh, caplog, {0: 10, 1: 11}) == fresh
    assert "exceeds the 11 training examples" in caplog.text
    assert len(list(run_dir.glob("checkpoints-refused-*"))) == 1


def test_a_checkpoint_missing_a_partition_is_refused_not_used(tmp_path, reference,
                                                              caplog) -> None:
    # Prepare: the checkpoint holds partition 0 only (its sha256 recomputed)
    run_dir, path = _interrupted(tmp_path, reference)
    plain = _plain(_uploads(reference)[:1])
    _forge(path, plain)
    fresh = _uploads(reference, scale=0.5)  # phase 1 of the resumed run: partitions 0 and 1
    # Execute
    used = _resume_with(run_dir, reference, fresh, caplog)
    # Assert: both sites' new uploads, never the checkpoint's single one
    assert used == fresh
    assert "holds the uploads of partitions [0], but this run's phase 1 accepted partitions " \
           "[0, 1] (missing [1], extra [])" in caplog.text
    assert not (run_dir / "checkpoints" / "clustering.pt").exists()


def test_a_checkpoint_with_another_count_for_a_partition_is_refused(tmp_path, reference,
                                                                   caplog) -> None:
    run_dir, path = _interrupted(tmp_path, reference)
    fresh = [ClientUpload(u.partition_id, u.state, u.num_examples + (u.partition_id == 1))
             for u in _uploads(reference, scale=0.5)]
    assert _resume_with(run_dir, reference, fresh, caplog) == fresh
    assert "partition 1 has num-examples=11, but it reported 12" in caplog.text


def test_an_upload_checkpoint_that_is_a_folder_is_refused_in_one_line(tmp_path, reference,
                                                                      caplog) -> None:
    run_dir, path = _interrupted(tmp_path, reference)
    path.unlink()
    path.mkdir()
    with pytest.raises(CheckpointRefused, match="uploads.pt is not a file"):
        load_uploads(path, reference)
    fresh = _uploads(reference, scale=0.5)
    assert _resume_with(run_dir, reference, fresh, caplog) == fresh
    assert path.is_file() and "is not a file" in caplog.text


def _cache_meta_is_a_list(entry) -> str:
    (entry / "meta.json").write_text("[]")
    return "meta.json"


def _cache_rewritten(change):
    """Change the cached payload with the real reader and writer; meta.json's sha256 is
    updated to match, as anyone who can write the cache folder can.
    """
    import json

    from fedbicross_flwr.storage.checkpoint_io import load_plain, save_plain

    def tamper(entry) -> str:
        meta = json.loads((entry / "meta.json").read_text())
        payload = load_plain(entry / "clients.pt", meta["sha256"])
        change(payload)
        meta["sha256"] = save_plain(payload, entry / "clients.pt")
        (entry / "meta.json").write_text(json.dumps(meta))
        return "clients.pt"
    return tamper


def _own_with_seven_classes(payload) -> None:
    payload["own"][0] = build_resnet18(1, 7, 4).state_dict()


def _failure_with_another_field(payload) -> None:
    payload["failures"].append({"partition_id": 1, "node": "local", "phase": "train",
                                "reason": "x", "extra": 1})


CACHE_TAMPERING = {  # what the cached entry read on main raised
    "meta-is-a-list": (_cache_meta_is_a_list, "AttributeError"),
    "own-model-of-7-classes": (_cache_rewritten(_own_with_seven_classes), "RuntimeError"),
    "failure-with-another-field": (_cache_rewritten(_failure_with_another_field), "TypeError"),
}


@pytest.mark.parametrize("kind", sorted(CACHE_TAMPERING))
def test_a_client_cache_entry_that_does_not_fit_the_run_is_set_aside_and_retrained(
        kind, tmp_path, tiny_run_config, caplog) -> None:
    # Prepare: phase 1 trained once (the cache filled), then one cache file altered
    from fedbicross_flwr.config.run_config import RunConfig
    from fedbicross_flwr.model import initial_state
    from fedbicross_flwr.storage import client_cache
    from fedbicross_flwr.transports.direct import DirectTransport

    cfg = RunConfig.from_run_config({**tiny_run_config, "model-width": 4})
    init = initial_state(cfg, 1, 3)
    first = DirectTransport(cfg, tmp_path).collect_models(cfg, init)
    entry = tmp_path / client_cache.cache_key(cfg)
    name = CACHE_TAMPERING[kind][0](entry)
    altered = (entry / name).read_bytes()
    # Execute: a later run reads the cache (no exception may escape)
    with caplog.at_level(logging.WARNING):
        again = DirectTransport(cfg, tmp_path).collect_models(cfg, init)
    # Assert: one line names the file; it is set aside; the clients are retrained, the same
    lines = [r.getMessage() for r in caplog.records if str(entry / name) in r.getMessage()]
    assert len(lines) == 1 and f"set aside as {name}.bad, retraining" in lines[0], caplog.text
    assert (entry / f"{name}.bad").read_bytes() == altered
    assert sorted(again.replies) == sorted(first.replies) == [0, 1, 2]
    assert all(torch.equal(again.replies[p].state[k], first.replies[p].state[k])
               for p in first.replies for k in init)
    assert client_cache.load(tmp_path, cfg, (cfg.in_channels, cfg.num_classes)) is not None  # the retrained entry is used again
