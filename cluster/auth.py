"""Ray's token authentication for drivers that join a cluster by address.

Ray 2.60 turns token authentication on by itself for ``ray.init()`` without an address when a
token exists (``~/.ray/auth_token``), but not for ``ray.init(address=...)``, and it reads the
mode once per process. :func:`use_token_if_available` does for an address what Ray does without
one, so ``craft-search sweep --address`` joins a cluster started with ``RAY_AUTH_MODE=token``.
"""

from __future__ import annotations

import os

__all__ = ["use_token_if_available"]


def use_token_if_available() -> bool:
    """Turn token authentication on in this process when ``RAY_AUTH_MODE`` is unset and a token
    exists; an explicit ``RAY_AUTH_MODE`` is respected. Returns whether token mode is on."""
    if "RAY_AUTH_MODE" in os.environ:
        return os.environ["RAY_AUTH_MODE"].lower() == "token"
    try:
        from ray._private.authentication.authentication_token_setup import maybe_enable_token_auth_if_token_available
    except ImportError:  # a Ray without token authentication
        return False
    return maybe_enable_token_auth_if_token_available(warn_if_disabled=False)
