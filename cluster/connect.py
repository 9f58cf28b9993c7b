"""Joining a Ray cluster from this process: token authentication, the note of the last
``ray start`` cluster on this machine, and :func:`connect_ray`.

Ray 2.60 turns token authentication on by itself for ``ray.init()`` without an address when a
token exists (``~/.ray/auth_token``), but not for ``ray.init(address=...)``, and it reads the
mode once per process. :func:`use_token_if_available` does for an address what Ray does without
one, so ``craft-search sweep --address`` joins a cluster started with ``RAY_AUTH_MODE=token``.
"""

from __future__ import annotations

import os
import socket
import sys
import tempfile
from pathlib import Path

__all__ = ["connect_ray", "use_token_if_available", "last_cluster_note"]


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


def last_cluster_note() -> Path:
    """Ray's note of the last ``ray start`` cluster on this machine (``ray_current_cluster`` in
    Ray's temp directory, ``RAY_TMPDIR`` respected), which ``ray.init()`` without an address joins."""
    try:
        from ray._private.utils import get_ray_address_file

        return Path(get_ray_address_file(None))
    except ImportError:
        return Path(os.environ.get("RAY_TMPDIR") or tempfile.gettempdir()) / "ray" / "ray_current_cluster"


def _live_default_address() -> str | None:
    """What ``ray.init()`` with no address should do: join the cluster of the last ``ray start``
    on this machine, as Ray does, or start a new local one ("local") when there is none or it
    is gone. Ray would otherwise retry a dead cluster's address for ever."""
    if os.environ.get("RAY_ADDRESS"):
        return None  # Ray's own choice, as asked
    try:
        last = last_cluster_note().read_text().strip()
    except OSError:
        return "local"
    if not last:
        return "local"
    host, _, port = last.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=2).close()
    except (OSError, ValueError):
        print(f"craft-search: the last Ray cluster ({last}) is gone; starting a local one", file=sys.stderr)
        return "local"
    return None


def connect_ray(address: str | None, local_env: dict[str, str] | None = None) -> None:
    """Join the Ray cluster at ``address`` (None: the one initialised here, else the last live
    ``ray start`` cluster on this machine, else a new local one).

    Args:
        address: a Ray address, or None.
        local_env: environment variables for every worker of a new local Ray (ignored otherwise).

    Raises:
        ValueError: the cluster cannot be reached or started, in one line.
    """
    import ray

    if ray.is_initialized():
        return
    address = address or _live_default_address()
    if address and address != "local":
        use_token_if_available()  # as Ray does by itself without an address
    runtime_env = {"env_vars": local_env} if local_env and address == "local" else None
    try:
        ray.init(address=address, include_dashboard=False, logging_level="WARNING", log_to_driver=False, runtime_env=runtime_env)
    except (ConnectionError, RuntimeError, ValueError) as err:
        where = f"at {address}" if address and address != "local" else "locally"
        raise ValueError(f"cannot start or reach Ray {where} ({str(err).splitlines()[0]}); check --address") from None
