"""A real, secured deployment on 127.0.0.1, built with the scripts in deploy/.

A SuperLink with TLS and SuperNode authentication; three registered SuperNodes, each with its
own small site archive; a fourth registered site whose archive is corrupt (it must be reported,
not crash the federation); and an unregistered SuperNode, which must be refused. FedBiCross
runs on a tiny config to completion with ``flwr run``. Every process is stopped by PID at the
end (each one runs with its own FLWR_HOME, which identifies it), also when the test fails.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import tomli_w

from fedbicross_flwr.runners.simulation import flwr_env, stop_processes
from tests.conftest import make_archive

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
FLWR = str(Path(sys.executable).parent / "flwr")

TINY_FEDBICROSS = {
    "method": "fedbicross", "dataset": "custom", "in-channels": 1, "num-classes": 3,
    "num-clients": 4, "min-clients": 3, "node-wait-timeout": 120.0, "local-epochs": 1,
    "pers-epochs": 1, "batch-size": 8, "local-lr": 0.01, "num-clusters": 2,
    "noise-samples": 4, "synth-steps": 2, "synth-batch": 4, "num-threads": 1,
    "progress": False, "run-name": "loopback",
}


def free_ports(n: int) -> list[int]:
    """N distinct free TCP ports on 127.0.0.1."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class Deployment:
    """Processes of the loopback federation, each with its own FLWR_HOME."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.homes: list[Path] = []
        self.procs: list[subprocess.Popen] = []

    def env(self, name: str) -> dict[str, str]:
        home = self.root / f"home-{name}"
        home.mkdir(parents=True, exist_ok=True)
        if home not in self.homes:
            self.homes.append(home)
        return {**flwr_env(home), "OMP_NUM_THREADS": "1"}

    def run(self, name: str, *cmd: str, timeout: float = 120) -> str:
        out = subprocess.run(list(cmd), env=self.env(name), capture_output=True, text=True,
                             timeout=timeout, cwd=ROOT)
        assert out.returncode == 0, f"{cmd} failed:\n{out.stdout}\n{out.stderr}"
        return out.stdout

    def start(self, name: str, *cmd: str, **env: str) -> subprocess.Popen:
        log = (self.root / f"{name}.log").open("w")
        proc = subprocess.Popen(list(cmd), env={**self.env(name), **env}, stdout=log,
                                stderr=subprocess.STDOUT, cwd=ROOT)
        self.procs.append(proc)
        return proc

    def log(self, name: str) -> str:
        return (self.root / f"{name}.log").read_text()

    def stop(self) -> None:
        for home in self.homes:
            stop_processes(home)
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=10)


def wait_for_port(port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.5)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


@pytest.mark.flwr_run
def test_secured_loopback_federation_runs_fedbicross(deployment, tmp_path) -> None:
    # Prepare: certificates, one key per site (+ a rogue one), site archives -----------------
    d = deployment
    link_port, *site_ports = free_ports(6)
    certs, keys = tmp_path / "certs", tmp_path / "keys"
    d.run("admin", str(DEPLOY / "make_certificates.sh"), str(certs))
    sites = ["site0", "site1", "site2", "site3", "rogue"]
    for site in sites:
        d.run("admin", str(DEPLOY / "make_site_key.sh"), str(keys), site)
    data = [make_archive(tmp_path / "data" / f"site{i}.npz", n_train=24, n_val=6, n_test=9,
                         seed=20 + i) for i in range(3)]
    corrupt = tmp_path / "data" / "site3.npz"
    corrupt.write_bytes(data[0].read_bytes()[:300])  # a transfer cut short
    data.append(corrupt)

    # Execute: SuperLink, operator connection, registration, SuperNodes, flwr run ----------
    link = d.start("superlink", str(DEPLOY / "start_superlink.sh"), str(certs),
                   str(tmp_path / "superlink-state"), "127.0.0.1", str(link_port))
    wait_for_port(link_port, 60)
    d.run("operator", str(DEPLOY / "add_connection.sh"), "hospitals",
          f"127.0.0.1:{link_port}", str(certs / "ca.crt"))
    for site in sites[:4]:  # the rogue key is never registered
        d.run("operator", FLWR, "supernode", "register", str(keys / f"{site}.pub"),
              "hospitals", "--name", site)
    # every site pins the app it reviewed: this checkout, hashed as `flwr run` bundles it
    reviewed = d.run("site0", sys.executable, "-m", "fedbicross_flwr.deploy.supernode_gate", "hash",
                     str(ROOT)).strip()
    pins = tmp_path / "pinned-apps.txt"
    pins.write_text(f"# the reviewed fedbicross-flwr checkout\n{reviewed}\n")
    for i, port in enumerate(site_ports[:4]):
        d.start(f"site{i}", str(DEPLOY / "start_supernode.sh"), f"127.0.0.1:{link_port}",
                str(certs / "ca.crt"), str(keys / f"site{i}"), str(data[i]), str(i),
                str(tmp_path / "out" / f"site{i}"), str(port), PINNED_APPS=str(pins))
    rogue = d.start("rogue", str(DEPLOY / "start_supernode.sh"), f"127.0.0.1:{link_port}",
                    str(certs / "ca.crt"), str(keys / "rogue"), str(data[0]), "9",
                    str(tmp_path / "out" / "rogue"), str(site_ports[4]), PINNED_APPS=str(pins))
    run_config = tmp_path / "run.toml"
    run_config.write_text(tomli_w.dumps({**TINY_FEDBICROSS,
                                         "output-dir": str(tmp_path / "results")}))
    run_id, status = flwr_run(d, ROOT, run_config)

    # Assert: the unregistered SuperNode was refused and exited -----------------------------
    assert rogue.wait(timeout=120) != 0
    assert "Failed to activate SuperNode" in d.log("rogue")
    assert "No SuperNode found with the given public key" in d.log("superlink")
    # Assert: the run completed with the three good sites; the corrupt one is reported ----
    assert status.get("status") == "finished:completed", (status, d.log("superlink")[-3000:])
    run_dir = tmp_path / "results" / "loopback"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["num-completed"] == 3
    (failure,) = summary["failures"]
    assert failure["partition_id"] == 3 and failure["phase"] == "train"
    assert "cannot read data archive" in failure["reason"] and str(corrupt) in failure["reason"]
    with (run_dir / "clients.csv").open() as fh:
        rows = {int(r["partition-id"]): r["status"] for r in csv.DictReader(fh)}
    assert rows == {0: "ok", 1: "ok", 2: "ok", 3: "missing"}
    assert (run_dir / "clusters.csv").is_file() and (run_dir / "weights.csv").is_file()
    # Assert: every good site kept its personalized model, at the site
    for i in range(3):
        assert (tmp_path / "out" / f"site{i}" / f"personalized-run{run_id}.pt").is_file()
    assert not list((tmp_path / "out" / "site3").glob("*.pt"))
    # Assert: TLS really was on (the SuperLink served HTTPS) and the link stayed up
    assert f"https://127.0.0.1:{link_port}" in d.log("superlink")
    assert link.poll() is None
    assert os.path.isfile(certs / "ca.crt")
    for i in range(4):
        assert f"app bundle sha256 {reviewed} is pinned" in d.log(f"site{i}")

    # Execute: the operator ships a modified app (one line more in the ClientApp) ---------
    modified = tmp_path / "modified-app"
    shutil.copytree(ROOT, modified, ignore=shutil.ignore_patterns(
        ".venv", ".git", "outputs", "docs", "__pycache__", "*.egg-info", ".pytest_cache"))
    with (modified / "client_app" / "app.py").open("a") as fh:
        fh.write("\nSENT_TO_THE_OPERATOR = True  # what a site did not review\n")
    changed = d.run("site0", sys.executable, "-m", "fedbicross_flwr.deploy.supernode_gate", "hash",
                    str(modified)).strip()
    run_config.write_text(tomli_w.dumps({**TINY_FEDBICROSS, "run-name": "modified",
                                         "output-dir": str(tmp_path / "results")}))
    bad_id, bad_status = flwr_run(d, modified, run_config)
    # Assert: every site refused it, named its hash, and ran none of it
    assert changed != reviewed
    assert bad_status["status"] == "finished:failed", bad_status
    for i in range(4):
        assert f"app bundle sha256 {changed} is NOT in the pinned apps" in d.log(f"site{i}")
        assert not (tmp_path / "out" / f"site{i}" / f"own-model-run{bad_id}.pt").exists()
    failures = json.loads((tmp_path / "results" / "modified" / "failures.json").read_text())
    assert len(failures) == 4 and all("FAB" in f["reason"] for f in failures), failures


def flwr_run(d: Deployment, app: Path, run_config: Path) -> tuple[str, dict]:
    """``flwr run`` ``app`` on the federation and wait for its final status."""
    started = json.loads(d.run("operator", FLWR, "run", str(app), "hospitals",
                               "--run-config", str(run_config), "--format", "json"))
    run_id = str(started["run-id"])
    deadline, status = time.monotonic() + 600, {}
    while time.monotonic() < deadline:
        status = json.loads(d.run("operator", FLWR, "list", "hospitals", "--run-id", run_id,
                                  "--format", "json"))["runs"][0]
        if status["status"].startswith("finished"):
            break
        time.sleep(3)
    return run_id, status


def test_deploy_doc_uses_the_kit_as_it_is() -> None:
    # Prepare: docs/DEPLOY.md's walk-through block
    import re
    import tomllib

    from fedbicross_flwr.config.run_config import RunConfig

    section = (ROOT / "docs" / "DEPLOY.md").read_text()
    block = section.split("```bash", 1)[1].split("```", 1)[0]
    # Assert: every deploy/ file it names exists (scripts executable)
    named = set(re.findall(r"deploy/[\w.]+", block))
    assert {"deploy/make_certificates.sh", "deploy/make_site_key.sh",
            "deploy/start_superlink.sh", "deploy/start_supernode.sh",
            "deploy/add_connection.sh", "deploy/make_demo_sites.py",
            "deploy/demo.toml"} == named
    for name in named:
        assert (ROOT / name).is_file(), name
        if name.endswith(".sh"):
            assert os.access(ROOT / name, os.X_OK), name
    # Assert: the demo run config is valid with the output-dir the block adds
    demo = tomllib.loads((DEPLOY / "demo.toml").read_text())
    cfg = RunConfig.from_run_config({**demo, "output-dir": "/tmp/x", "run-name": "demo"})
    assert (cfg.method, cfg.dataset, cfg.num_clients) == ("fedbicross", "custom", 3)
    # Assert: the same TLS/auth flags as the loopback test's processes
    superlink = (DEPLOY / "start_superlink.sh").read_text()
    for flag in ("--ssl-ca-certfile", "--ssl-certfile", "--ssl-keyfile",
                 "--enable-supernode-auth", "--disable-runtime-dependency-installation"):
        assert flag in superlink
    assert "--insecure" not in superlink + (DEPLOY / "start_supernode.sh").read_text()
