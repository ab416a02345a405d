"""The ClientApp's mods: what a site applies to a message before its handler sees it.

The project's ClientApp (``client_app.app``) installs :func:`dp_clipping_mod`; the direct
transport (:class:`fedbicross_flwr.transports.direct.DirectTransport`) applies the same mod to a
multi-round method's round messages, as a site would. This module imports Flower lazily.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from flwr.app import Context, Message
    from flwr.clientapp.typing import ClientAppCallable

# The round-config key that tells a site which Flower clipping mod to apply.
CLIPPING_KEY = "dp-clipping"


def dp_clipping_mod(msg: "Message", context: "Context",
                    call_next: "ClientAppCallable") -> "Message":
    """ClientApp mod: Flower's client-side DP clipping when the round asks for it.

    A ``train`` message whose config carries ``dp-clipping`` goes through Flower's
    ``fixedclipping_mod`` or ``adaptiveclipping_mod``; every other message passes unchanged.
    """
    config = msg.content["config"] if "config" in msg.content else None
    mode = config.get(CLIPPING_KEY) if config is not None else None  # type: ignore[union-attr]
    if msg.metadata.message_type != "train" or mode is None:
        return call_next(msg, context)
    from flwr.clientapp.mod import adaptiveclipping_mod, fixedclipping_mod

    mod = fixedclipping_mod if mode == "fixed" else adaptiveclipping_mod
    return mod(msg, context, call_next)


__all__ = ["CLIPPING_KEY", "dp_clipping_mod"]
