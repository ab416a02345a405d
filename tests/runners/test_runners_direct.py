"""The one-process runner (no Flower): several methods on the same trained clients."""

from __future__ import annotations

import csv

import pytest

from fedbicross_flwr.config.run_config import RunConfig
from fedbicross_flwr.runners.direct import run_direct_methods


def _rows(path) -> dict[int, dict]:
    with (path / "clients.csv").open() as fh:
        return {int(r["partition-id"]): r for r in csv.DictReader(fh)}


def test_methods_share_the_same_client_models(tiny_run_config) -> None:
    # Prepare
    cfg = RunConfig.from_run_config({**tiny_run_config, "run-name": "shared"})
    # Execute
    dirs = run_direct_methods(cfg, ["local", "fedavg1"])
    # Assert: one folder per method, identical local models (phase 1 ran once)
    assert dirs["local"].name == "shared-local" and dirs["fedavg1"].name == "shared-fedavg1"
    local, avg = _rows(dirs["local"]), _rows(dirs["fedavg1"])
    assert sorted(local) == sorted(avg) == [0, 1, 2]
    for pid in local:
        assert local[pid]["local-test-acc"] == avg[pid]["local-test-acc"]
        # `local` sends each client its own model: "before" is the local model's accuracy
        assert float(local[pid]["acc-before"]) == pytest.approx(
            float(local[pid]["local-test-acc"]))


@pytest.mark.parametrize("shape", [{}, {"dataset": "digits", "data-path": "", "in-channels": 0,
                                     "num-classes": 0}],
                         ids=["declared", "read-from-the-data"])  # 0: the dataset says
def test_client_cache_is_reused_and_a_tampered_entry_is_rejected(tiny_run_config, tmp_path,
                                                                  monkeypatch, shape) -> None:
    import fedbicross_flwr.transports.direct as direct
    from fedbicross_flwr.storage import client_cache

    cfg = RunConfig.from_run_config({**tiny_run_config, **shape, "run-name": "cache"})
    cache = tmp_path / "cache"
    calls = []
    real = direct.run_local_training
    monkeypatch.setattr(direct, "run_local_training",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    # First run trains the 3 clients and fills the cache
    first = run_direct_methods(cfg, ["local"], cache)
    assert len(calls) == 3
    entry = cache / client_cache.cache_key(cfg)
    assert (entry / "clients.pt").is_file() and (entry / "meta.json").is_file()
    # Second run: no training, identical local models
    second = run_direct_methods(cfg.replace(run_name="cache2"), ["local"], cache)
    assert len(calls) == 3
    assert _rows(first["local"])[0]["local-test-acc"] == _rows(second["local"])[0]["local-test-acc"]
    # Tampered entry: detected by the checksum and retrained
    with (entry / "clients.pt").open("ab") as fh:
        fh.write(b"tamper")
    run_direct_methods(cfg.replace(run_name="cache3"), ["local"], cache)
    assert len(calls) == 6
    # Other local-training settings: another key, never the old entry
    assert client_cache.cache_key(cfg.replace(local_epochs=2)) != client_cache.cache_key(cfg)


def test_a_phase_1_stopped_half_way_resumes_with_the_clients_left(tiny_run_config, tmp_path,
                                                                   monkeypatch) -> None:
    import fedbicross_flwr.transports.direct as direct
    from fedbicross_flwr.storage import client_cache

    cfg = RunConfig.from_run_config({**tiny_run_config, "run-name": "stopped"})
    whole = run_direct_methods(cfg.replace(run_name="whole"), ["local"])  # no cache
    cache = tmp_path / "cache"
    calls: list[int] = []
    real = direct.run_local_training

    def stop_at_third(cfg_, site, *a, **k):
        calls.append(site.partition_id)
        if len(calls) == 3:
            raise KeyboardInterrupt  # the session ends during client 2's training
        return real(cfg_, site, *a, **k)

    monkeypatch.setattr(direct, "run_local_training", stop_at_third)
    with pytest.raises(KeyboardInterrupt):
        run_direct_methods(cfg, ["local"], cache)
    entry = cache / client_cache.cache_key(cfg)
    assert sorted(p.name for p in entry.glob("client-*.pt")) == ["client-0.pt", "client-1.pt"]
    # Resumed: only client 2 trains, and every model is the one an unbroken phase 1 gives
    resumed = run_direct_methods(cfg.replace(run_name="resumed"), ["local"], cache)
    assert calls == [0, 1, 2, 2]
    assert _rows(resumed["local"]).keys() == _rows(whole["local"]).keys()
    for pid, row in _rows(whole["local"]).items():
        assert _rows(resumed["local"])[pid]["local-test-acc"] == row["local-test-acc"]
    # An altered kept client is retrained, not used
    with (entry / "client-0.pt").open("ab") as fh:
        fh.write(b"tamper")
    assert 0 not in client_cache.load_clients(cache, cfg, (cfg.in_channels, cfg.num_classes))
