"""Only the operator may use the SuperLink's Control API; a site may only use the Fleet API.

How "a site" and "the operator" are told apart on one machine: the SuperLink listens on
0.0.0.0, as in a real deployment. The operator's ``flwr`` connects to 127.0.0.1 (on the
SuperLink machine, or at the end of an SSH tunnel), so the SuperLink sees a loopback client.
Every site process (its SuperNode, its ``flwr`` CLI, a raw HTTPS client) connects to this
machine's own non-loopback address, as a hospital on the network does; Linux then uses that
address as the source, so the SuperLink sees the client exactly as it would see another host
on that network. The test checks this premise first and is skipped on a machine without a
non-loopback IPv4 address. Each side has its own FLWR_HOME and only ``ca.crt``.

The site's SuperNode must still come online through the Fleet API; the site's attempts to
register a key, start a run, unregister a site, and call the Runtime API must be refused; the
operator's same requests must succeed. The gate's address and path rules are checked without
any network in ``test_operator_gate_rules``.
"""

from __future__ import annotations

import asyncio
import fcntl
import ipaddress
import json
import socket
import ssl
import struct
import subprocess
import time
import urllib.error
import urllib.request

import pytest

from fedbicross_flwr.deploy.superlink_gate import (
    DEFAULT_OPERATOR_NETWORKS,
    OperatorGate,
    is_operator_address,
    is_site_path,
    parse_networks,
    split_arguments,
)
from tests.test_deploy_loopback import DEPLOY, FLWR, ROOT, free_ports, wait_for_port

REFUSED = "only available to the federation operator"


def site_side_address() -> str | None:
    """A non-loopback IPv4 address of this machine from which a connection to it arrives with
    that (non-loopback) source address, or None.
    """
    candidates = []
    for _, name in socket.if_nameindex():
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            try:  # SIOCGIFADDR: the interface's IPv4 address
                packed = fcntl.ioctl(s.fileno(), 0x8915, struct.pack("256s", name.encode()[:15]))
            except OSError:
                continue
        address = socket.inet_ntoa(packed[20:24])
        if not ipaddress.ip_address(address).is_loopback:
            candidates.append(address)
    for address in candidates:
        with socket.socket() as server:
            server.bind(("0.0.0.0", 0))
            server.listen()
            try:
                with socket.create_connection((address, server.getsockname()[1]), timeout=2):
                    conn, (peer, _) = server.accept()
                    conn.close()
            except OSError:
                continue
        if not ipaddress.ip_address(peer).is_loopback:
            return address
    return None


def test_operator_gate_rules() -> None:
    # Assert: the path rule (only the Fleet API and /health are for sites)
    assert is_site_path("/v1/fleet/pull-messages") and is_site_path("/health")
    for path in ("/v1/control/start-run", "/v1/runtime/get-nodes", "/docs", "/openapi.json",
                 "/v1/fleet/../control/start-run", "/v1/fleet//x", "/v1/fleetx", "/"):
        assert not is_site_path(path), path
    # Assert: the address rule (loopback by default; dual-stack v4 clients judged as v4)
    default = parse_networks(",".join(DEFAULT_OPERATOR_NETWORKS))
    for host in ("127.0.0.1", "127.3.2.1", "::1", "::ffff:127.0.0.1"):
        assert is_operator_address(host, default), host
    for host in ("192.0.2.7", "::ffff:192.0.2.7", "fd00::2", None, "", "unix-socket"):
        assert not is_operator_address(host, default), host
    assert is_operator_address("10.0.5.7", parse_networks("10.0.5.0/24"))
    with pytest.raises(ValueError, match="not an IP address"):
        parse_networks("10.0.5.0/24,hospital-net")
    networks, rest = split_arguments(["--operator-networks", "10.0.5.7", "--port", "1"])
    assert [str(n) for n in networks] == ["10.0.5.7/32"] and rest == ["--port", "1"]
    # a SuperLink bound to one address reaches its own Runtime API from that address
    networks, _ = split_arguments(["--host", "192.0.2.9"])
    assert is_operator_address("192.0.2.9", networks)
    assert not is_operator_address("192.0.2.10", networks)
    for host in ("0.0.0.0", "::", "127.0.0.1", "superlink.example.org"):
        networks, _ = split_arguments(["--host", host])
        assert [str(n) for n in networks] == list(DEFAULT_OPERATOR_NETWORKS), host

    # Execute: the middleware itself, as uvicorn calls it, for a site and the operator
    def call(path: str, client: str) -> int:
        statuses: list[int] = []

        async def app(scope, receive, send) -> None:
            await send({"type": "http.response.start", "status": 200, "headers": []})

        async def send(message) -> None:
            if message["type"] == "http.response.start":
                statuses.append(message["status"])

        scope = {"type": "http", "method": "POST", "path": path, "client": (client, 5000)}
        asyncio.run(OperatorGate(app, default)(scope, None, send))
        return statuses[0]

    assert call("/v1/control/start-run", "192.0.2.7") == 403
    assert call("/v1/runtime/pull-messages", "192.0.2.7") == 403
    assert call("/v1/fleet/pull-messages", "192.0.2.7") == 200
    assert call("/v1/control/start-run", "127.0.0.1") == 200


@pytest.mark.flwr_run
def test_site_cannot_use_the_control_api_and_the_operator_can(deployment, tmp_path) -> None:
    # Prepare: the site-side address; certificates that name it; keys; the SuperLink --------
    site_ip = site_side_address()
    if site_ip is None:
        pytest.skip(reason="this machine has no non-loopback IPv4 address to act as a site's address")
    d = deployment
    link_port, node_port = free_ports(2)
    certs, keys = tmp_path / "certs", tmp_path / "keys"
    d.run("admin", str(DEPLOY / "make_certificates.sh"), str(certs), site_ip)
    for site in ("site0", "rogue"):
        d.run("admin", str(DEPLOY / "make_site_key.sh"), str(keys), site)
    link = d.start("superlink", str(DEPLOY / "start_superlink.sh"), str(certs),
                   str(tmp_path / "state"), "0.0.0.0", str(link_port))
    wait_for_port(link_port, 60)
    d.run("operator", str(DEPLOY / "add_connection.sh"), "hospitals",
          f"127.0.0.1:{link_port}", str(certs / "ca.crt"))
    d.run("site0-cli", str(DEPLOY / "add_connection.sh"), "hospitals",
          f"{site_ip}:{link_port}", str(certs / "ca.crt"))

    def flwr(who: str, *args: str) -> tuple[int, str]:
        out = subprocess.run([FLWR, *args], env=d.env(who), capture_output=True, text=True,
                             timeout=120, cwd=ROOT)
        return out.returncode, out.stdout + out.stderr

    # Execute + Assert: the operator registers site0; site0's SuperNode comes online through
    # the Fleet API from the site's address
    code, out = flwr("operator", "supernode", "register", str(keys / "site0.pub"), "hospitals",
                     "--name", "site0", "--format", "json")
    assert code == 0, out
    node_id = str(json.loads(out)["node-id"])
    d.start("site0", str(DEPLOY / "start_supernode.sh"), "--allow-any-app",
            f"{site_ip}:{link_port}",
            str(certs / "ca.crt"), str(keys / "site0"), str(tmp_path / "site0.npz"), "0",
            str(tmp_path / "out0"), str(node_port))
    deadline, nodes = time.monotonic() + 90, []
    while time.monotonic() < deadline:
        code, out = flwr("operator", "supernode", "list", "hospitals", "--format", "json")
        assert code == 0, out
        nodes = json.loads(out)["nodes"]
        if any(str(n["node-id"]) == node_id and n["status"] == "online" for n in nodes):
            break
        time.sleep(2)
    assert any(str(n["node-id"]) == node_id and n["status"] == "online" for n in nodes), (
        nodes, d.log("site0")[-2000:])

    # Execute + Assert: every Control API call of the site is refused, with the reason
    run_config = "num-clients=1 node-wait-timeout=0.0 method='local'"
    attempts = {
        "register a key": ("supernode", "register", str(keys / "rogue.pub"), "hospitals"),
        "start a run": ("run", str(ROOT), "hospitals", "--run-config", run_config),
        "unregister a site": ("supernode", "unregister", node_id, "hospitals"),
        "list the sites": ("supernode", "list", "hospitals"),
    }
    for what, args in attempts.items():
        code, out = flwr("site0-cli", *args)
        assert code != 0 and REFUSED in out, (what, code, out)
    # ... and so is the Runtime API (what the ServerApp uses), from a plain HTTPS client
    context = ssl.create_default_context(cafile=str(certs / "ca.crt"))
    request = urllib.request.Request(f"https://{site_ip}:{link_port}/v1/runtime/get-nodes",
                                     data=b"", method="POST")
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, context=context, timeout=30)
    assert refused.value.code == 403
    # The SuperLink is untouched by the attempts: site0 is still there, nothing else is
    code, out = flwr("operator", "supernode", "list", "hospitals", "--format", "json")
    assert [str(n["node-id"]) for n in json.loads(out)["nodes"]
            if n["status"] != "unregistered"] == [node_id], out
    code, out = flwr("operator", "list", "hospitals", "--format", "json")
    assert code == 0 and json.loads(out)["runs"] == [], out

    # Execute + Assert: the operator's same requests succeed
    code, out = flwr("operator", "supernode", "register", str(keys / "rogue.pub"), "hospitals",
                     "--format", "json")
    assert code == 0, out
    code, out = flwr("operator", "run", str(ROOT), "hospitals", "--run-config", run_config,
                     "--format", "json")
    assert code == 0, out
    run_id = str(json.loads(out)["run-id"])
    code, out = flwr("operator", "stop", run_id, "hospitals")
    assert code == 0, out
    code, out = flwr("operator", "supernode", "unregister", node_id, "hospitals")
    assert code == 0, out
    code, out = flwr("operator", "supernode", "list", "hospitals", "--format", "json")
    status = {str(n["node-id"]): n["status"] for n in json.loads(out)["nodes"]}
    assert status[node_id] == "unregistered", status
    # The gate was in front of the SuperLink and logged what it refused
    log = d.log("superlink")
    assert "operator gate: Control and Runtime APIs only for clients in 127.0.0.0/8" in log
    assert f"refused POST /v1/control/start-run from {site_ip}" in log
    assert link.poll() is None
