r"""The federation's SuperLink with the operator's APIs closed to the sites.

Flower 1.42 serves every SuperLink API on ONE HTTPS port, told apart only by the path:

* ``/v1/fleet/``: the Fleet API, what a SuperNode (a site) needs;
* ``/v1/control/``: the Control API of the ``flwr`` CLI (register and unregister SuperNode
  keys, start and stop runs, read logs);
* ``/v1/runtime/``: the Runtime API of the ServerApp (it sees every message of a run).

Anyone who can reach the port and holds ``ca.crt`` could use all three: TLS only proves the
SuperLink's identity, and SuperNode authentication only guards the Fleet API. The old
``--control-api-address`` is deprecated (the Control API now shares the HTTP port), and
Flower's account authentication needs its enterprise package.

:func:`main` therefore starts Flower's own ``flower-superlink`` (same arguments) with one
middleware in front of its app, :class:`OperatorGate`: the Fleet API and ``/health`` answer
everyone; every other path answers only a client whose address is in the operator networks
(default: loopback, i.e. the SuperLink machine itself or an SSH tunnel to it) and is refused
with HTTP 403 otherwise, before any Flower code runs.

Usage::

    python -m fedbicross_flwr.deploy.superlink_gate [--operator-networks CIDR[,CIDR...]] \
        <flower-superlink arguments>
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import posixpath
import sys
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from typing import Any

from fedbicross_flwr.logging_utils import log

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

# What a site may use: the Fleet API (SuperNode registration with its key, heartbeats,
# messages, the app bundle) and the health check. Everything else is the operator's.
SITE_PATH_PREFIXES = ("/v1/fleet/",)
SITE_PATHS = frozenset({"/health"})
DEFAULT_OPERATOR_NETWORKS = ("127.0.0.0/8", "::1/128")


def parse_networks(spec: str | Iterable[str]) -> tuple[Network, ...]:
    """Networks from ``"10.0.5.0/24,::1"`` (or an iterable of such strings).

    Raises
    ------
    ValueError
        A part that is not an IP address or network; an empty list.
    """
    parts = spec.split(",") if isinstance(spec, str) else list(spec)
    networks = []
    for part in (p.strip() for p in parts):
        if not part:
            continue
        try:
            networks.append(ipaddress.ip_network(part, strict=False))
        except ValueError as err:
            raise ValueError(f"operator network {part!r} is not an IP address or network "
                             f"(e.g. 127.0.0.0/8, 10.0.5.7, ::1): {err}") from err
    if not networks:
        raise ValueError("no operator network given; the default is "
                         f"{','.join(DEFAULT_OPERATOR_NETWORKS)}")
    return tuple(networks)


def is_site_path(path: str) -> bool:
    """True for a path every site may use (Fleet API, health check).

    A path that is not in normal form (``..``, ``//``, ``/./``) is never a site path, so no
    spelling of an operator path can pass as a Fleet path.
    """
    if posixpath.normpath(path) != path.rstrip("/") or "//" in path:
        return False
    return path in SITE_PATHS or path.startswith(SITE_PATH_PREFIXES)


def is_operator_address(host: str | None, networks: Iterable[Network]) -> bool:
    """True if the client address ``host`` lies in one of ``networks``.

    An IPv4 client of a dual-stack listener shows as ``::ffff:a.b.c.d`` and is judged by its
    IPv4 address. Anything that is not an IP address (no client, a Unix socket) is not the
    operator.
    """
    if not host:
        return False
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return any(address.version == net.version and address in net for net in networks)


class OperatorGate:
    """ASGI middleware: operator-only paths are refused (403) to clients outside the networks.

    Parameters
    ----------
    app : ASGIApp
        The SuperLink's app (Flower's FastAPI app).
    operator_networks : Iterable[Network]
        Client networks that may use every API (Control, Runtime, docs).
    """

    def __init__(self, app: ASGIApp, operator_networks: Iterable[Network]) -> None:
        self.app = app
        self.operator_networks = tuple(operator_networks)
        log(logging.INFO, "operator gate: Control and Runtime APIs only for clients in %s; "
            "sites get %s", ", ".join(map(str, self.operator_networks)),
            ", ".join([*SITE_PATH_PREFIXES, *sorted(SITE_PATHS)]))

    def allows(self, scope: Scope) -> bool:
        """Whether the request in ``scope`` may pass."""
        if is_site_path(str(scope.get("path", ""))):
            return True
        client = scope.get("client")
        return is_operator_address(client[0] if client else None, self.operator_networks)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """ASGI entry: pass allowed requests to Flower's app, answer 403 to the others."""
        if scope["type"] not in ("http", "websocket") or self.allows(scope):
            await self.app(scope, receive, send)
            return
        client = scope.get("client")
        who = client[0] if client else "an unknown client"
        log(logging.WARNING, "operator gate: refused %s %s from %s (not an operator address)",
            scope.get("method", "WEBSOCKET"), scope.get("path"), who)
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        body = json.dumps({"detail": f"{scope.get('path')} is only available to the federation "
                                     "operator (on the SuperLink machine or through an SSH "
                                     "tunnel to it)"}).encode()
        await send({"type": "http.response.start", "status": 403,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


def install_gate(operator_networks: Iterable[Network]) -> None:
    """Make Flower's SuperLink app factory add :class:`OperatorGate` as outermost middleware.

    ``flower-superlink`` builds its app with ``flwr.superlink.main.create_app`` when it starts
    serving; the wrapped factory adds the gate to every app it builds.
    """
    import flwr.superlink.main as superlink_main

    networks = tuple(operator_networks)
    original = superlink_main.create_app
    if getattr(original, "operator_gate", False):
        return

    def create_app(*args: Any, **kwargs: Any) -> Any:
        app = original(*args, **kwargs)
        app.add_middleware(OperatorGate, operator_networks=networks)
        return app

    create_app.operator_gate = True  # type: ignore[attr-defined]
    superlink_main.create_app = create_app


def split_arguments(argv: list[str]) -> tuple[tuple[Network, ...], list[str]]:
    """(operator networks, the arguments left for ``flower-superlink``).

    When ``--host`` is one specific address (not 0.0.0.0 or ::), the SuperLink's own
    ServerApp process connects to that address and so comes from it: the address joins the
    operator networks (only a process on the SuperLink machine can have it as its source).
    """
    spec: str = ",".join(DEFAULT_OPERATOR_NETWORKS)
    rest: list[str] = []
    host = ""
    it = iter(argv)
    for arg in it:
        if arg == "--operator-networks":
            spec = next(it, "")
        elif arg.startswith("--operator-networks="):
            spec = arg.split("=", 1)[1]
        else:
            rest.append(arg)
    for i, arg in enumerate(rest):
        if arg == "--host" and i + 1 < len(rest):
            host = rest[i + 1]
        elif arg.startswith("--host="):
            host = arg.split("=", 1)[1]
    networks = parse_networks(spec)
    try:
        own = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        own = None
    if own is not None and not own.is_unspecified and not is_operator_address(str(own), networks):
        networks = (*networks, ipaddress.ip_network(own))
    return networks, rest


def main(argv: list[str] | None = None) -> None:
    """``flower-superlink`` with :class:`OperatorGate` (arguments as ``flower-superlink``)."""
    try:
        networks, rest = split_arguments(list(sys.argv[1:] if argv is None else argv))
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    install_gate(networks)
    # uvicorn replaces the client address with X-Forwarded-For from the hosts listed in
    # FORWARDED_ALLOW_IPS (default 127.0.0.1 only); a wider list would let a site claim to be
    # the operator, so the default is kept.
    os.environ.pop("FORWARDED_ALLOW_IPS", None)
    from flwr.superlink.cli.flower_superlink import flower_superlink

    sys.argv = ["flower-superlink", *rest]
    flower_superlink()


if __name__ == "__main__":
    main()
