"""A site's SuperNode that runs only the app bundles the site has reviewed, offline.

In a Flower deployment the ClientApp a site runs is not the code installed at the site: it
comes in the app bundle (FAB) that the operator's ``flwr run`` ships through the SuperLink.
The ClientApp's own checks (the metric allowlist, the refusal to send data) are therefore
only as good as the bundle. Flower 1.42's ``--trusted-entities`` would check a signature on
the bundle, but only a SuperLink that signs apps (``valid_license``) provides one, which the
open-source SuperLink does not.

:func:`main` starts Flower's own ``flower-supernode`` (same arguments) with one more check,
in the place where Flower verifies a bundle: the bundle's sha256 must be on the site's list
of pinned apps. A bundle that is not is never
stored or run; Flower replies to the server with its own "FAB verification failed" error,
and the site's log names the refused hash. A site computes the hash of the code it reviewed
with ``hash``: it is the FAB that ``flwr run`` builds from that project folder (Flower
builds FABs deterministically), so the operator must run exactly that code.

Usage::

    python -m fedbicross_flwr.deploy.supernode_gate hash PROJECT_DIR
    python -m fedbicross_flwr.deploy.supernode_gate --pinned-apps FILE <flower-supernode arguments>
    python -m fedbicross_flwr.deploy.supernode_gate --allow-any-app <flower-supernode arguments>

``FILE`` holds one sha256 (64 hex digits) per line; ``#`` starts a comment. A missing, empty,
unreadable or malformed pin file refuses to start; only ``--allow-any-app`` starts a SuperNode
that runs any bundle, and that is logged as a warning.
"""

from __future__ import annotations

import hashlib
import logging
import re
import sys
from pathlib import Path
from typing import Any

from fedbicross_flwr.logging_utils import log

PIN_MARK = "fedbicross-pinned-apps"  # stands in for the signing SuperLink's licence record
_SHA256 = re.compile(r"[0-9a-f]{64}")


def read_pins(path: Path) -> frozenset[str]:
    """The pinned sha256s of a pin file.

    Raises
    ------
    ValueError
        The file cannot be read, a line is not one sha256, or it pins nothing.
    """
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as err:
        raise ValueError(f"pinned-apps file {path} cannot be read: {err.strerror}") from err
    pins = set()
    for number, line in enumerate(lines, start=1):
        value = line.split("#", 1)[0].strip().lower()
        if not value:
            continue
        if not _SHA256.fullmatch(value):
            raise ValueError(f"{path}:{number}: {value!r} is not a sha256 (64 hex digits)")
        pins.add(value)
    if not pins:
        raise ValueError(f"pinned-apps file {path} pins no app")
    return frozenset(pins)


def app_sha256(project_dir: Path) -> str:
    """The sha256 of the FAB that ``flwr run project_dir`` ships (Flower's own build)."""
    from flwr.cli.build import build_fab_from_disk

    return hashlib.sha256(build_fab_from_disk(Path(project_dir))).hexdigest()


def install_pins(pins: frozenset[str]) -> None:
    """Make this process's SuperNode accept only bundles whose sha256 is in ``pins``.

    Flower verifies a bundle in ``_pull_and_store_message`` when it is given trusted
    entities: a bundle without a licence record is refused, any other goes to ``_verify_fab``.
    The wrapper turns that check on, marks every bundle it pulls, and ``_verify_fab`` becomes
    the pin check, so the refusal takes Flower's own path (error reply, nothing stored).
    """
    import flwr.supernode.start_client_internal as supernode

    original = supernode._pull_and_store_message  # noqa: SLF001 - Flower 1.42's hook
    if getattr(original, "pinned_apps", None) is not None:
        return

    def verify(fab: Any, trusted_entities: dict[str, str]) -> bool:
        digest = hashlib.sha256(fab.content).hexdigest()
        if digest in pins:
            log(logging.INFO, "app bundle sha256 %s is pinned: it may run", digest)
            return True
        log(logging.ERROR, "app bundle sha256 %s is NOT in the pinned apps: refused, "
            "nothing of it runs", digest)
        return False

    def pull_and_store(**kwargs: Any) -> Any:
        get_fab = kwargs["get_fab"]

        def marked(fab_hash: str, run_id: int) -> Any:
            fab = get_fab(fab_hash, run_id)
            fab.verifications = {**fab.verifications, "valid_license": PIN_MARK}
            return fab

        return original(**{**kwargs, "get_fab": marked, "trusted_entities": {PIN_MARK: ""}})

    pull_and_store.pinned_apps = pins  # type: ignore[attr-defined]
    supernode._pull_and_store_message = pull_and_store  # type: ignore[assignment]  # noqa: SLF001
    supernode._verify_fab = verify  # noqa: SLF001


def parse_gate_arguments(args: list[str]) -> tuple[str | None, bool, list[str]]:
    """``(pin file, --allow-any-app, Flower's arguments)`` of the gate's command line.

    Raises
    ------
    ValueError
        ``--pinned-apps`` without a file (missing, empty, or followed by another option), or
        given together with ``--allow-any-app``, or neither given.
    """
    pin_file, allow_any, rest, it = None, False, [], iter(args)
    for arg in it:
        if arg == "--allow-any-app":
            allow_any = True
        elif arg == "--pinned-apps" or arg.startswith("--pinned-apps="):
            value = arg.split("=", 1)[1] if "=" in arg else next(it, None)
            if value is None or value.startswith("--"):
                raise ValueError("--pinned-apps FILE is required after --pinned-apps")
            if not value.strip():
                raise ValueError("--pinned-apps is empty: give the file of the sha256s of the "
                                 "app bundles this site reviewed")
            pin_file = value
        else:
            rest.append(arg)
    if pin_file is not None and allow_any:
        raise ValueError("give --pinned-apps FILE or --allow-any-app, not both")
    if pin_file is None and not allow_any:
        raise ValueError("--pinned-apps FILE is required (one sha256 per line; `hash "
                         "PROJECT_DIR` prints an app's), or --allow-any-app to run any app "
                         "the operator ships")
    return pin_file, allow_any, rest


def main(argv: list[str] | None = None) -> None:
    """``hash PROJECT_DIR``, or ``flower-supernode`` with the site's pinned apps (or, with
    ``--allow-any-app``, with none: logged as a warning).
    """
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["hash"]:
        if len(args) != 2 or not Path(args[1]).is_dir():
            print("usage: python -m fedbicross_flwr.deploy.supernode_gate hash PROJECT_DIR",
                  file=sys.stderr)
            raise SystemExit(2)
        print(app_sha256(Path(args[1])))
        return
    try:
        pin_file, allow_any, rest = parse_gate_arguments(args)
        pins = read_pins(Path(pin_file)) if pin_file is not None else None
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    if pins is None:
        log(logging.WARNING, "this SuperNode runs ANY app bundle the operator ships "
            "(--allow-any-app): no app is pinned, so the ClientApp's guards hold only as far "
            "as the operator's code keeps them")
    else:
        install_pins(pins)
        log(logging.INFO, "this SuperNode runs only the %d pinned app(s) of %s", len(pins),
            pin_file)
    from flwr.supernode.cli.flower_supernode import flower_supernode

    sys.argv = ["flower-supernode", *rest]
    flower_supernode()


if __name__ == "__main__":
    main()
