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


def use_token_if_available() -> None:
    """Current Ray clusters require a token; Ray's clients only send one when
    ``RAY_AUTH_MODE=token``. Turn that on when a token is at hand (``RAY_AUTH_TOKEN``,
    ``RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token``). Must run before Ray reads its config."""
    if os.environ.get("RAY_AUTH_MODE"):
        return  # the user decided
    token_file = os.environ.get("RAY_AUTH_TOKEN_PATH") or os.path.expanduser("~/.ray/auth_token")
    if os.environ.get("RAY_AUTH_TOKEN") or os.path.isfile(token_file):
        os.environ["RAY_AUTH_MODE"] = "token"


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
    if address_kind(address) != "local":
        use_token_if_available()  # before Ray reads its configuration
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
        if kind == "client" and runtime_env is None:
            # Ray Client: the driver is here, the work there; ship this code and the
            # non-secret environment (S3 endpoint, caches) along.
            from agpctl.jobs import FORWARDED_ENV, package_dirs

            env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
            kwargs["runtime_env"] = {"py_modules": package_dirs(), "env_vars": env}
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


def local_cpu_share(cluster_cpus: float, consumers: int) -> float:
    """CPUs each of ``consumers`` concurrent workers or tasks reserves on the embedded Ray:
    the machine shared evenly (a laptop run uses every core), at least 1."""
    return float(max(1, int(cluster_cpus // max(1, consumers))))


def use_assigned_cpus() -> None:
    """Inside a Ray worker or task: torch's intra-op threads follow the CPUs Ray reserved for
    it (Ray itself caps them at 1 otherwise)."""
    import ray
    import torch

    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU")
    if cpus:
        torch.set_num_threads(max(1, int(cpus)))


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else exc.__class__.__name__
