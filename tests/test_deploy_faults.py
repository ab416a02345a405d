"""Sites that die or freeze in a real loopback deployment (deploy/ scripts, TLS, SuperNode auth).

Four registered sites, bound to their partitions with ``site-nodes``, ``min-clients = 2``, and a
``round-timeout`` of 10 minutes that no case may wait for:

1. One run: as phase 1 starts, one SuperNode is SIGKILLed and another one SIGSTOPped; once a
   third site has delivered its upload, it is SIGKILLed too, before it personalizes. Flower
   stops receiving their heartbeats; each fails with that reason, named by partition and
   phase, long before round-timeout, and the run completes with the last site.
2. The SuperLink is SIGKILLed during FedBiCross's server stage and started again on its state.
   The ServerApp stops, its log says what is kept and how to go on, the run ends failed, and the
   same ``flwr run`` with ``resume=true`` finishes from the checkpoints.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import tomli_w

from tests.conftest import make_archive
from tests.test_deploy_loopback import (
    DEPLOY,
    FLWR,
    ROOT,
    Deployment,
    free_ports,
    wait_for_port,
)

ROUND_TIMEOUT = 600.0
OFFLINE = "no reply: the node went offline (Flower stopped receiving its heartbeats)"
NODE_UNAVAILABLE = ("no reply (Error: Node Unavailable — The destination node failed to report "
                    "a heartbeat within 2 × its expected interval.)")
TINY = {"method": "fedavg1", "dataset": "custom", "in-channels": 1, "num-classes": 3,
        "num-clients": 4, "min-clients": 2, "node-wait-timeout": 120.0,
        "round-timeout": ROUND_TIMEOUT, "local-epochs": 1, "pers-epochs": 1, "batch-size": 8,
        "local-lr": 0.01, "model-width": 8, "num-threads": 1, "progress": False,
        "keep-checkpoints": True}

# FedBiCross with a server stage of some seconds after the clustering checkpoint
SERVER_STAGE = {"synth-steps": 100, "synth-batch": 16, "noise-samples": 8}


class Federation:
    """A SuperLink and four SuperNodes of :class:`Deployment`, restartable by site."""

    def __init__(self, d: Deployment, root: Path) -> None:
        self.d, self.root = d, root
        self.link_port, *self.site_ports = free_ports(5)
        self.certs, self.keys = root / "certs", root / "keys"
        d.run("admin", str(DEPLOY / "make_certificates.sh"), str(self.certs))
        self.data = [make_archive(root / "data" / f"site{i}.npz", n_train=24, n_val=6,
                                  n_test=9, seed=30 + i) for i in range(4)]
        for i in range(4):
            d.run("admin", str(DEPLOY / "make_site_key.sh"), str(self.keys), f"site{i}")
        self.start_link()
        d.run("operator", str(DEPLOY / "add_connection.sh"), "hospitals",
              f"127.0.0.1:{self.link_port}", str(self.certs / "ca.crt"))
        self.node_of = {i: str(json.loads(d.run(
            "operator", FLWR, "supernode", "register", str(self.keys / f"site{i}.pub"),
            "hospitals", "--name", f"site{i}", "--format", "json"))["node-id"]) for i in range(4)}
        self.sites: dict[int, subprocess.Popen] = {}
        for i in range(4):
            self.start_site(i)

    def start_link(self) -> None:
        self.link = self.d.start("superlink", str(DEPLOY / "start_superlink.sh"),
                                 str(self.certs), str(self.root / "superlink-state"),
                                 "127.0.0.1", str(self.link_port))
        wait_for_port(self.link_port, 60)

    def start_site(self, i: int) -> subprocess.Popen:
        proc = self.d.start(f"site{i}", str(DEPLOY / "start_supernode.sh"), "--allow-any-app",
                            f"127.0.0.1:{self.link_port}", str(self.certs / "ca.crt"),
                            str(self.keys / f"site{i}"), str(self.data[i]), str(i),
                            str(self.root / "out" / f"site{i}"), str(self.site_ports[i]))
        self.sites[i] = proc
        return proc

    def wait_online(self, count: int, timeout: float = 120) -> list[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            listed = json.loads(self.d.run("operator", FLWR, "supernode", "list", "hospitals",
                                           "--format", "json"))["nodes"]
            online = [str(n["node-id"]) for n in listed if n["status"] == "online"]
            if len(online) >= count:
                return online
            time.sleep(1)
        raise TimeoutError(f"fewer than {count} SuperNodes online after {timeout}s")

    def flwr_run(self, run_name: str, **overrides: object) -> str:
        cfg = self.root / f"{run_name}.toml"
        sites = ",".join(f"{i}={nid}" for i, nid in self.node_of.items())
        cfg.write_text(tomli_w.dumps({**TINY, "run-name": run_name, "site-nodes": sites,
                                      "output-dir": str(self.root / "results"),
                                      **overrides}))
        started = json.loads(self.d.run("operator", FLWR, "run", str(ROOT), "hospitals",
                                        "--run-config", str(cfg), "--format", "json"))
        return str(started["run-id"])

    def status(self, run_id: str) -> str:
        return json.loads(self.d.run("operator", FLWR, "list", "hospitals", "--run-id", run_id,
                                     "--format", "json"))["runs"][0]["status"]

    def wait_finished(self, run_id: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if (status := self.status(run_id)).startswith("finished"):
                return status
            time.sleep(3)
        return "not finished"


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise TimeoutError(f"{what} after {timeout}s")


@pytest.fixture
def federation(deployment, tmp_path) -> Federation:
    return Federation(deployment, tmp_path)


@pytest.mark.flwr_run
def test_dead_and_frozen_sites_are_named_and_a_superlink_crash_resumes(federation,
                                                                       tmp_path) -> None:
    f = federation
    f.wait_online(4)

    # Execute 1: kill site 3 and freeze site 2 in phase 1, kill site 1 before phase 3 ----
    run_id = f.flwr_run("sites")
    run_dir = tmp_path / "results" / "sites"
    wait_for(lambda: "node(s) connected" in _read(run_dir / "log.txt"), 120,
             "the ServerApp did not start phase 1")
    start = time.monotonic()
    os.kill(f.sites[3].pid, signal.SIGKILL)
    os.kill(f.sites[2].pid, signal.SIGSTOP)
    try:
        # site 1 dies once its upload is delivered: it is lost in phase 3, after the server
        # stage (its heartbeats stop while the server still waits for sites 2 and 3)
        wait_for(lambda: "Sent successfully" in f.d.log("site1"), 120,
                 "site 1 did not send its phase-1 reply")
        os.kill(f.sites[1].pid, signal.SIGKILL)
        status = f.wait_finished(run_id, 300)
    finally:
        os.kill(f.sites[2].pid, signal.SIGCONT)
    # Assert: no wait for round-timeout; each lost site named, by phase, with Flower's reason
    assert status == "finished:completed", (status, _read(run_dir / "log.txt")[-3000:])
    assert time.monotonic() - start < ROUND_TIMEOUT / 2
    summary = json.loads((run_dir / "summary.json").read_text())
    lost = {x["partition_id"]: x["phase"] for x in summary["failures"]}
    assert lost == {1: "personalize", 2: "train", 3: "train"}
    # the reason: the SuperLink's expired-message error, or the node list (whichever is first)
    assert all(x["reason"] in (OFFLINE, NODE_UNAVAILABLE) for x in summary["failures"]), summary
    with (run_dir / "clients.csv").open() as fh:
        rows = {int(r["partition-id"]): r["status"] for r in csv.DictReader(fh)}
    assert rows == {0: "ok", 1: "missing", 2: "missing", 3: "missing"}
    out = tmp_path / "out"
    assert [i for i in range(4) if (out / f"site{i}" / f"personalized-run{run_id}.pt").exists()
            ] == [0]
    assert (out / "site1" / f"own-model-run{run_id}.pt").exists()  # it trained, then died

    # Execute 2: SuperLink SIGKILLed in the server stage, restarted on its state ----------
    for i in (1, 3):
        f.start_site(i)  # the run waits for them (node-wait-timeout)
    run_id = f.flwr_run("linkdown", method="fedbicross", **SERVER_STAGE)
    run_dir = tmp_path / "results" / "linkdown"
    wait_for((run_dir / "checkpoints" / "clustering.pt").is_file, 300,
             "the server stage did not start")
    os.kill(f.link.pid, signal.SIGKILL)
    f.link.wait()
    # Assert: the ServerApp stopped, and its log says what is kept and how to go on
    wait_for(lambda: "the run was stopped before it finished" in _read(run_dir / "log.txt"),
             60, "the ServerApp's log did not say it was stopped")
    assert "rerun the same command with run-name='linkdown' resume=true" in _read(
        run_dir / "log.txt")
    assert (run_dir / "checkpoints" / "uploads.pt").is_file()
    assert not (run_dir / "summary.json").exists()
    f.start_link()
    resumed = f.flwr_run("linkdown", method="fedbicross", resume=True,
                          **SERVER_STAGE)
    # Assert: the same run-name with resume=true finishes from the checkpoints
    assert f.wait_finished(resumed, 300) == "finished:completed", _read(run_dir / "log.txt")
    log_text = _read(run_dir / "log.txt")
    assert "resume: using the 4 checkpointed uploads" in log_text
    assert json.loads((run_dir / "summary.json").read_text())["num-completed"] == 4
    # Assert: the interrupted run ended failed (Flower: no heartbeat from its ServerApp)
    assert f.wait_finished(run_id, 120) == "finished:failed"


def _read(path: Path) -> str:
    return path.read_text() if path.is_file() else ""
