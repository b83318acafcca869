"""Connecting to Ray: an embedded local instance by default, or a remote cluster.

The embedded instance binds to 127.0.0.1 only and is shut down when the command ends.
Ray's token authentication is left as Ray configures it: the token is read by Ray itself
from ``RAY_AUTH_TOKEN`` or its standard file and never printed here.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from urllib.parse import urlparse

from agpctl.errors import UserError


def address_kind(address: str | None) -> str:
    """'local' (embedded), 'client' (ray://), 'jobs' (http(s)://) or 'cluster' (host:port / auto)."""
    if not address:
        return "local"
    if address.startswith("ray://"):
        return "client"
    if address.startswith(("http://", "https://")):
        return "jobs"
    return "cluster"


def _check_reachable(address: str) -> None:
    parsed = urlparse(address if "://" in address else f"tcp://{address}")
    host, port = parsed.hostname, parsed.port
    if not host or not port:
        return
    try:
        with socket.create_connection((host, port), timeout=5):
            pass
    except OSError as exc:
        raise UserError(f"cannot reach Ray at {address} ({exc.strerror or exc}); check the address and that the cluster is up") from None


@contextlib.contextmanager
def ray_session(address: str | None, num_cpus: int | None = None, runtime_env: dict | None = None):
    """``ray.init`` for the duration of a command; shuts down only what it started."""
    import ray

    if ray.is_initialized():  # e.g. inside a Ray job or a Tune trial: use what is there
        yield ray
        return
    kind = address_kind(address)
    if kind == "jobs":
        raise UserError(f"{address} is a Ray Jobs address; it is used through job submission, not ray.init")
    kwargs: dict = {"logging_level": "WARNING", "log_to_driver": False, "runtime_env": runtime_env}
    if kind == "local":
        kwargs.update(
            num_cpus=num_cpus or os.cpu_count() or 1,
            include_dashboard=True,
            dashboard_host="127.0.0.1",
            _node_ip_address="127.0.0.1",
        )
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    else:
        _check_reachable(address)
        kwargs["address"] = address
    # Ray announces its (default-on) token authentication on every start; the token
    # itself is never printed, the announcement is just noise for our users.
    logging.getLogger("ray").setLevel(logging.ERROR)
    try:
        ray.init(**kwargs)
    except ConnectionError as exc:
        raise UserError(f"cannot connect to Ray at {address}: {_one_line(exc)}") from None
    except RuntimeError as exc:
        message = _one_line(exc)
        if "version" in message.lower():
            raise UserError(f"Ray version mismatch with {address}: {message}; install the cluster's Ray version here") from None
        if "auth" in message.lower() or "token" in message.lower():
            raise UserError(f"Ray at {address} refused authentication; set RAY_AUTH_TOKEN or ~/.ray/auth_token to the cluster's token") from None
        raise
    try:
        yield ray
    finally:
        ray.shutdown()


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else exc.__class__.__name__
